"""Console scripts (pyproject's [project.scripts]): each runs its module exactly as `python -m MODULE ARGS` does, so
--help and usage errors are answered before torch is imported (every command line parses its arguments before its
heavy imports, under `if __name__ == "__main__"`)."""

import runpy


def _run(module: str) -> None:
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
    """lrkv-train ARGS: exactly `python train.py ARGS` (which answers --help and config errors before heavy imports)."""
    _run("train")


def generate() -> None:
    """lrkv-generate ARGS: `python -m lrkv.generate ARGS`."""
    _run("lrkv.generate")


def export() -> None:
    """lrkv-export ARGS: `python -m lrkv.export ARGS`."""
    _run("lrkv.export")


def convert() -> None:
    """lrkv-convert ARGS: `python -m lrkv.convert_hf ARGS`."""
    _run("lrkv.convert_hf")


def evaluate() -> None:
    """lrkv-eval ARGS: `python -m eval ARGS`."""
    _run("eval")
