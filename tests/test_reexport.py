"""Re-exporting into an existing export folder replaces the export's files and keeps everything else byte for byte;
a full disk during an export is one error naming the folder, with no temporary folder left behind."""

import errno
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from lrkv.atomic import DiskFullError
from lrkv.config import load_config
from lrkv.export import load_export, model_state_dict, save_export
from lrkv.model import Transformer

USER_FILES = {"NOTES.md": b"# my notes\nlr 3e-3 looked best\n", "results/ppl.csv": b"step,ppl\n100,41.2\n",
              "results/deep/plot.png": bytes(range(256))}


def weights(seed: int, cfg):
    torch.manual_seed(seed)
    return model_state_dict(Transformer(cfg))


@pytest.fixture
def cfg():
    return load_config("lrkv_debug.yaml", ["--model.n_layer=1", "--model.vocab_size=300"]).model


def test_reexport_keeps_user_files_and_replaces_the_export(cfg, tmp_path):
    out = tmp_path / "export"
    tok = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(tok))
    save_export(weights(0, cfg), cfg, out, tok)
    for name, data in USER_FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    new = weights(1, cfg)
    save_export(new, cfg, out)  # no tokenizer this time: the old export's tokenizer files must go
    for name, data in USER_FILES.items():
        assert (out / name).read_bytes() == data, f"{name} changed"
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    loaded = load_export(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in new.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tokenizer.json"]  # no temporary folder left


def test_disk_full_during_export_is_one_error_and_leaves_nothing(cfg, tmp_path, monkeypatch):
    import lrkv.export

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial file, as a real full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lrkv.export, "save_file", full)
    out = tmp_path / "export"
    need = sum(t.numel() * t.element_size() for t in weights(0, cfg).values())
    with pytest.raises(DiskFullError, match=rf"{out}: no space left on the device \(needs about "
                                            rf"{need / 1e6:.1f} MB, "):
        save_export(weights(0, cfg), cfg, out)
    assert list(tmp_path.iterdir()) == []
