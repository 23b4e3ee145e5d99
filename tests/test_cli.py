"""Command lines behave like the ecosystem's: --help everywhere (config fields included), before heavy imports where
the script checks its arguments first, usage lines that name the program, one error line for a bad start."""

import dataclasses
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lrkv.config import Config, _field_comments

ROOT = Path(__file__).resolve().parent.parent
LIGHT = {"train.py": ["train.py"], "lrkv.config": ["-m", "lrkv.config"], "lrkv.info": ["-m", "lrkv.info"]}


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120, **kw)


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_help_lists_every_config_field_before_torch_is_imported(name, tmp_path):
    """--help exits 0 with the program's usage and every config field as --section.key with its note; torch is never
    imported on the way (that is what keeps it well under 3 s, whatever the machine's load)."""
    args = [str(ROOT / a) if a.endswith(".py") else a for a in LIGHT[name]]
    r = run(["-X", "importtime", *args, "--help"], cwd=ROOT)  # importtime lists every module imported, on stderr
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [line for line in r.stderr.splitlines() if line.rstrip().endswith("| torch")]
    out = r.stdout
    usage = {"train.py": "usage: python train.py --config FILE", "lrkv.config": "usage: python -m lrkv.config",
             "lrkv.info": "usage: python -m lrkv.info"}[name]
    assert out.startswith(usage)
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            assert f"--{section.name}.{f.name}=" in out
            assert notes.get(f.name), f"{section.name}.{f.name} has no note in lrkv/config.py"


@pytest.mark.parametrize("module", ["perplexity", "long_context", "lrqk_agreement", "kv_memory", "head_diversity",
                                    "compare", "ruler", "models"])
def test_eval_usage_lines_name_the_module(module, capsys):
    main = importlib.import_module(f"eval.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m eval.{module}")


def test_train_without_arguments_refuses_instead_of_a_default_run(tmp_path):
    r = run([str(ROOT / "train.py")], cwd=tmp_path)
    assert r.returncode == 2 and "give --config FILE" in r.stderr
    assert not any(tmp_path.iterdir())  # no runs/debug appeared


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_one_error_line(tmp_path):
    r = run([str(ROOT / "train.py"), "--config", "lrkv_debug.yaml", "--log.wandb=true"], cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: log.wandb=true: the wandb package is not installed (pip install 'lrkv[wandb]')"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("module", ["lrkv.config", "lrkv.info"])
def test_config_errors_are_one_line_not_a_traceback(module, tmp_path):
    r = run(["-m", module, "--config", "lrkv_debug.yaml", "--model.rank_kk=3"], cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: unknown config key 'model.rank_kk' (did you mean 'rank_k'?)"]
