"""Command lines behave like the ecosystem's: --help everywhere (config fields included), before heavy imports
(each command line parses its arguments before importing torch), usage lines that name the program, one error line
for a bad start; the installed package (the wheel pip would install) resolves every shipped config by name and its
console scripts answer --help the same way."""

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lrkv.config import CONFIG_DIR, Config, _field_comments
from lrkv.inference.sparse import SparseConfig, sparse_config

ROOT = Path(__file__).resolve().parent.parent
# every command line: how it is started (a path is under the repository) and the program its usage line names
ENTRY_POINTS = {
    "train.py": (["train.py"], "python train.py --config FILE"),
    "lrkv.config": (["-m", "lrkv.config"], "python -m lrkv.config"),
    "lrkv.info": (["-m", "lrkv.info"], "python -m lrkv.info"),
    "lrkv.generate": (["-m", "lrkv.generate"], "python -m lrkv.generate"),
    "lrkv.export": (["-m", "lrkv.export"], "python -m lrkv.export"),
    "lrkv.convert_hf": (["-m", "lrkv.convert_hf"], "python -m lrkv.convert_hf"),
    "eval": (["-m", "eval"], "python -m eval"),
    "eval run": (["-m", "eval", "run"], "python -m eval run"),
    "eval perplexity": (["-m", "eval", "perplexity"], "python -m eval.perplexity"),  # python -m eval MODULE ARGS
    **{f"eval.{m}": (["-m", f"eval.{m}"], f"python -m eval.{m}")
       for m in ("perplexity", "lrqk_agreement", "kv_memory", "head_diversity", "compare", "models", "ruler",
                 "long_context")},
    **{f"benchmarks/{b}": ([f"benchmarks/{b}"], f"python benchmarks/{b}")
       for b in ("decode.py", "kernel.py", "kernel_aot.py", "train_throughput.py")},
}
CONFIG_CLIS = ("train.py", "lrkv.config", "lrkv.info", "benchmarks/train_throughput.py")  # take every config field


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120, **kw)


def help_of(name: str) -> subprocess.CompletedProcess:
    """`ENTRY_POINT --help` under -X importtime, which lists every module imported on stderr."""
    args = [str(ROOT / a) if a.endswith(".py") else a for a in ENTRY_POINTS[name][0]]
    return run(["-X", "importtime", *args, "--help"], cwd=ROOT)


def imports_torch(importtime: str) -> bool:
    """Whether -X importtime's report lists torch, imported at the top or by another module (indented)."""
    return re.search(r"^import time: .*\|\s+torch$", importtime, re.M) is not None


def undocumented(help_text: str) -> list[str]:
    """Arguments that --help lists without a description. argparse prints an argument's help after its flags (two
    or more spaces on) or, when the flags are long, on the next line, indented deeper; config_help likewise."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("positional arguments:", "options:", "config:"))
    return [line.strip() for line, after in zip(lines[start:], lines[start + 1:] + [""])
            if re.match(r"  \S", line) and not re.search(r"\S {2,}\S", line.strip()) and not re.match(r" {4}", after)]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_answers_before_torch_is_imported(name):
    """--help exits 0 with the program's usage line and a description for every argument (for commands that take a
    config: every config field as --section.key with its note); torch is never imported on the way (that is what
    keeps it well under 3 s, whatever the machine's load)."""
    r = help_of(name)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not imports_torch(r.stderr)
    out = r.stdout
    assert out.startswith(f"usage: {ENTRY_POINTS[name][1]}"), out[:200]
    assert not undocumented(out)
    if name not in CONFIG_CLIS:
        return
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            assert f"--{section.name}.{f.name}=" in out
            assert notes.get(f.name), f"{section.name}.{f.name} has no note in lrkv/config.py"


def code_choices() -> dict[str, list[str]]:
    """Per command line, what its --help must show of names the code defines in modules the parser may not import
    (they import torch), so the parser spells them out."""
    from eval.__main__ import SUITES
    from eval.common import VARIANTS
    from eval.long_context import TASKS
    from lrkv.convert_hf import DTYPES as CONVERT_DTYPES
    from lrkv.inference.generator import CACHE_MODES, DTYPES
    from lrkv.inference.sparse import POLICIES, PRESETS, SparseConfig, policy_class
    from lrkv.kernels.lrkv_attn import SMEM_LIMIT

    def braces(names) -> str:
        return "{" + ",".join(map(str, names)) + "}"

    return {
        "lrkv.generate": [braces(CACHE_MODES), braces(sorted(DTYPES)), braces(sorted(PRESETS)), braces(POLICIES),
                          f"Loki's PCA rank (default {policy_class('lrqk').Knobs.rank})",
                          f"always attended (default {SparseConfig.recent})"],
        "lrkv.convert_hf": [braces(sorted(CONVERT_DTYPES))],
        "eval run": [braces(sorted(SUITES))],
        "eval.compare": [f"(default {','.join(VARIANTS)})"],
        "eval.long_context": [", ".join(TASKS)],
        "eval.ruler": [braces(sorted(DTYPES))],
        "benchmarks/decode.py": [braces(sorted(DTYPES)), braces(sorted(PRESETS))],
        "benchmarks/kernel_aot.py": [braces(sorted(SMEM_LIMIT))],
    }


@pytest.mark.parametrize("name", ["lrkv.generate", "lrkv.convert_hf", "eval run", "eval.compare", "eval.long_context",
                                  "eval.ruler", "benchmarks/decode.py", "benchmarks/kernel_aot.py"])
def test_help_offers_the_choices_the_code_defines(name):
    out = " ".join(help_of(name).stdout.split())  # argparse wraps lines at spaces
    for text in code_choices()[name]:
        assert text in out


def parser_of(name: str):
    """An entry point's parser(); benchmarks/decode.py is a script, loaded from its path."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("decode_benchmark", ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.parser()
    return importlib.import_module(name).parser()


# every command line with LRQK flags: its required arguments, then (argv, the SparseConfig and sweep lists it reads
# back) with no LRQK flag (each command's defaults as before the shared helper) and with some given
LRQK_COMMANDS = {
    "lrkv.generate": (["--checkpoint", "x", "--prompt", "p"],
                      ([], SparseConfig(), {}),
                      (["--lrqk-preset", "accuracy", "--recent", "7", "--policy", "h2o", "--sparse-query-tail", "2"],
                       SparseConfig(top_k=4096, recent=7, policy="h2o", sparse_query_tail=2).tuned(rank=64), {})),
    "eval.long_context": (["--export", "x"],
                          ([], SparseConfig(top_k=64, recent=16, sinks=4).tuned(rank=8), {}),
                          (["--rank", "3", "--top-k", "9", "--recent", "2", "--sinks", "0", "--seed", "5"],
                           SparseConfig(top_k=9, recent=2, sinks=0).tuned(rank=3), {})),  # --seed is the items' seed
    "eval.ruler": ([],
                   ([], SparseConfig(recent=32, sinks=4).tuned(rank=32), {}),
                   (["--rank", "4", "--recent", "8", "--sinks", "2", "--budget", "24"],
                    SparseConfig(recent=8, sinks=2).tuned(rank=4), {})),
    "eval.lrqk_agreement": (["--export", "x"],
                            ([], SparseConfig(recent=16, sinks=4), {"ranks": [4, 8, 16], "top_ks": [16, 32, 64]}),
                            (["--ranks", "2,3", "--top-ks", "5", "--recent", "1"], SparseConfig(recent=1, sinks=4),
                             {"ranks": [2, 3], "top_ks": [5]})),
    "benchmarks/decode.py": ([],
                             ([], SparseConfig(sinks=0, proxy="shared"), {"policies": ["lrqk"]}),
                             (["--lrqk-preset", "memory", "--sinks", "2", "--proxy", "group", "--policies",
                               "exact,quest"], SparseConfig(top_k=1024, recent=32, sinks=2, proxy="group").tuned(rank=16),
                              {"policies": ["exact", "quest"]})),
}


@pytest.mark.parametrize("name", sorted(LRQK_COMMANDS))
def test_sparse_flags_read_back_the_same_way_everywhere(name):
    """add_sparse_args/sparse_config: each command keeps its flag names and defaults; --lrqk-preset sets rank/top-k/
    recent and explicit flags override it; swept fields are comma lists the command iterates."""
    required, *cases = LRQK_COMMANDS[name]
    for argv, expected, sweeps in cases:
        args = parser_of(name).parse_args(required + argv)
        assert sparse_config(args) == expected
        assert {k: getattr(args, k) for k in sweeps} == sweeps


def test_lrqk_base_config_applies_without_a_preset_and_bad_lists_are_usage_errors(capsys):
    p = parser_of("benchmarks/decode.py")
    base = SparseConfig(top_k=256).tuned(rank=8)  # the benchmark's defaults that depend on the model and device
    assert sparse_config(p.parse_args(["--top-k", "9"]), base) == SparseConfig(top_k=9).tuned(rank=8)
    assert sparse_config(p.parse_args(["--lrqk-preset", "paper"]), base) == SparseConfig(top_k=2048, recent=64).tuned(rank=32)
    with pytest.raises(SystemExit) as e:
        parser_of("eval.lrqk_agreement").parse_args(["--export", "x", "--ranks", "4,y"])
    assert e.value.code == 2
    assert "argument --ranks: invalid comma-separated int value: '4,y'" in capsys.readouterr().err


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


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel pip would install, built (setuptools, no network) from a copy of this checkout's packaged files and
    unpacked into a folder outside the repository: what `pip install lrkv` puts in site-packages."""
    pytest.importorskip("setuptools.build_meta")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lrkv", "eval", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = run(["-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp / 'dist')!r}))"],
            cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    with zipfile.ZipFile(tmp / "dist" / r.stdout.split()[-1]) as wheel:
        wheel.extractall(tmp / "site")
    return tmp / "site"


def run_installed(site: Path, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """python -c CODE ARGS with the unpacked wheel first on the path (before the checkout's editable install)."""
    check = f"import lrkv; assert lrkv.__file__.startswith({str(site)!r}), lrkv.__file__\n"
    return run(["-X", "importtime", "-c", check + code, *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(site)})


def test_wheel_holds_every_module_and_config(installed):
    """A package added under lrkv/ or eval/ must be listed in pyproject.toml: the wheel holds every module of the
    checkout, and configs/*.yaml as lrkv/configs/."""
    expected = {Path("train.py")} | {p.relative_to(ROOT) for d in ("lrkv", "eval") for p in (ROOT / d).rglob("*.py")}
    expected |= {Path("lrkv/configs") / p.name for p in (ROOT / "configs").glob("*.yaml")}
    found = {p.relative_to(installed) for p in installed.rglob("*") if p.is_file()
             and not p.relative_to(installed).parts[0].endswith(".dist-info")}
    assert found == expected


def test_installed_package_resolves_every_shipped_config_by_name(installed, tmp_path):
    """`lrkv-train --config lrkv_debug.yaml` outside the repository: every configs/*.yaml loads by its bare name from
    the installed package (cwd is an empty folder)."""
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert len(names) >= 10
    code = ("import sys; from lrkv.config import CONFIG_DIR, load_config\n"
            "for name in sys.argv[1:]: load_config(name)\n"
            "print(CONFIG_DIR)")
    r = run_installed(installed, code, *names, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == installed / "lrkv" / "configs"
    r = run_installed(installed, "from lrkv.cli import train; train()", "--config", "lrkv_debug.yaml", "--help",
                      cwd=tmp_path)
    assert r.returncode == 0 and "lrkv_debug.yaml" in r.stdout, r.stderr[-2000:]


def test_console_scripts_answer_help_before_torch_is_imported(installed, tmp_path):
    """Every [project.scripts] entry of the built wheel, called as its console script calls it, with --help."""
    (dist_info,) = installed.glob("*.dist-info")
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", (dist_info / "entry_points.txt").read_text(), re.M))
    assert set(scripts) == {"lrkv-train", "lrkv-generate", "lrkv-export", "lrkv-convert", "lrkv-eval", "lrkv-info",
                            "lrkv-config"}
    for name, target in scripts.items():
        module, func = target.split(":")
        r = run_installed(installed, f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; "
                                     f"sys.exit({func}())", "--help", cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("usage: "), (name, r.stderr[-2000:])
        assert not imports_torch(r.stderr), name
