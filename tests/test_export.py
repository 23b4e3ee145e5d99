"""Export from training checkpoints (`python -m lrkv.export`): round trip, run folders, refusals.

The DeepSpeed ZeRO folder path is tested end to end in test_multinode.py.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, models
from torch.utils.data import DataLoader

from lrkv.config import load_config
from lrkv.export import ExportError, export_checkpoint, load_export, main, model_state_dict, open_export, save_export
from lrkv.lit import LitLM
from lrkv.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model.vocab_size=96", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--model.head_dim=32",
        "--model.rank_k=4", "--model.rank_v=4", "--model.ffn_dim=96", "--model.max_seq_len=32", "--data.seq_len=16",
        "--train.max_steps=2", "--train.warmup_steps=1", "--train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(LitLM after 2 steps, a run folder with checkpoints/last.ckpt and tokenizer.json) from a real Trainer.fit."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1))
    batches = DataLoader(list(zip(tokens[:, :-1], tokens[:, 1:])), batch_size=cfg.train.micro_batch_size)
    lit = LitLM(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.train.max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, batches)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    Tokenizer(models.BPE()).save(str(run / "tokenizer.json"))
    return lit, run


def test_roundtrip_from_checkpoint_file_gives_the_modules_logits(trained, tmp_path, capsys):
    lit, run = trained
    main([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "export")])
    assert "exported" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    model = load_export(tmp_path / "export")
    x = torch.randint(0, lit.cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), lit.model.eval()(x))


def test_open_export_owns_config_tokenizer_stop_ids_and_model(trained, tmp_path):
    """One reader of an export folder: the config, the tokenizer, the stop ids of generation_config.json (an int or
    a list, as transformers writes either), the model; a missing tokenizer or a corrupt generation config is an
    error naming the file."""
    from lrkv.tokenizer import TokenizerError

    lit, run = trained
    out = export_checkpoint(run, tmp_path / "export")
    gen = out / "generation_config.json"
    for eos, expected in (([7, 5], (5, 7)), (3, (3,))):
        gen.write_text(json.dumps({"eos_token_id": eos}))
        ex = open_export(out)
        assert (ex.config, ex.eos_ids, ex.tokenizer.get_vocab_size()) == (lit.cfg.model, expected, 0)
    x = torch.randint(0, lit.cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ex.model()(x), lit.model.eval()(x))
    gen.write_text("{")
    with pytest.raises(ExportError, match="generation_config.json: not valid JSON"):
        open_export(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        open_export(out)


def test_run_folder_means_its_last_checkpoint(trained, tmp_path):
    lit, run = trained
    model = load_export(export_checkpoint(run, tmp_path / "export"))
    assert torch.equal(model.embed.weight, lit.model.embed.weight.detach())


def test_loading_needs_neither_lightning_nor_deepspeed(trained, tmp_path):
    export_checkpoint(trained[1], tmp_path / "export")
    code = ("import sys; sys.modules['lightning'] = sys.modules['deepspeed'] = None  # any import of them fails\n"
            f"from lrkv.export import load_export; load_export({str(tmp_path / 'export')!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tensors_not_matching_the_config_are_refused_by_name(trained, tmp_path):
    run = trained[1]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["config"]["model"]["rank_k"] = 8  # the saved b_k tensors have rank 4
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ExportError, match=r"tensor 'layers.0.attn.b_k' has shape \(2, 4, 32\), the config implies "
                                          r"\(2, 8, 32\)"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "export", run / "tokenizer.json")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_config"])
def test_unreadable_checkpoint_is_a_clear_error(trained, tmp_path, capsys, damage):
    run = trained[1]
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    elif damage == "garbage":
        bad.write_text("not a checkpoint")
    else:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        del ckpt["hyper_parameters"]
        torch.save(ckpt, bad)
    shutil.copy(run / "tokenizer.json", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), str(tmp_path / "export")])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    expected = "holds no lrkv model config" if damage == "no_config" else "cannot read checkpoint"
    assert message.startswith(f"error: {bad}: {expected}"), message


def test_bad_paths_are_refused(trained, tmp_path):
    run = trained[1]
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "export")
    with pytest.raises(ExportError, match="has no checkpoints/last.ckpt"):
        export_checkpoint(tmp_path, tmp_path / "export")
    with pytest.raises(ExportError, match="exists and is not an export folder"):
        export_checkpoint(run, run / "checkpoints")  # would replace the checkpoints
    ckpt_only = tmp_path / "elsewhere" / "last.ckpt"
    ckpt_only.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", ckpt_only)
    with pytest.raises(ExportError, match="no tokenizer.json .* pass --tokenizer"):
        export_checkpoint(ckpt_only, tmp_path / "export")


@pytest.mark.parametrize("foreign", [{"notes.txt": "keep me"}, {"config.json": '{"model_type": "llama"}'}])
def test_save_export_never_replaces_a_foreign_folder(tmp_path, foreign):
    """A folder holding anything but an lrkv export (a Hugging Face model folder has a config.json too) is refused
    and left as it was; an older lrkv export in the same place is replaced."""
    cfg = load_config("lrkv_debug.yaml", ["--model.n_layer=1", "--model.vocab_size=300"]).model
    weights = model_state_dict(Transformer(cfg))
    out = tmp_path / "out"
    out.mkdir()
    for name, text in foreign.items():
        (out / name).write_text(text)
    with pytest.raises(ExportError, match="not an lrkv export folder"):
        save_export(weights, cfg, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == foreign
    shutil.rmtree(out)
    save_export(weights, cfg, out)
    save_export(weights, cfg, out)  # replacing an export is allowed
    assert load_export(out).cfg == cfg


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_modes_follow_the_umask(tmp_path, umask):
    """Folder 0755 and files 0644 under the usual umask (a server running as another user can read them), as private
    as the caller asks under a stricter one; a re-export keeps that for the files it replaces."""
    cfg = load_config(None, TINY).model
    tok = tmp_path / "tok.json"
    Tokenizer(models.BPE()).save(str(tok))
    old = os.umask(umask)
    try:
        out = save_export(model_state_dict(Transformer(cfg)), cfg, tmp_path / "export", tok)
        save_export(model_state_dict(Transformer(cfg)), cfg, out, tok)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json", "modeling_lrkv.py"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}
