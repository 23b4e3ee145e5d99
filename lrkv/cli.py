"""Console scripts (pyproject's [project.scripts]) for entry points that live outside the lrkv package."""

import runpy


def train() -> None:
    """lrkv-train ARGS: exactly `python train.py ARGS` (which answers --help and config errors before heavy imports)."""
    runpy.run_module("train", run_name="__main__", alter_sys=True)
