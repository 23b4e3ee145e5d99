"""The export folder: the interface between training and inference/evaluation.

    <dir>/config.json        every ModelConfig field (flat) + model_type / architectures
    <dir>/model.safetensors  the state dict (a tied lm_head is stored once, as embed.weight)
    <dir>/tokenizer.json     HF `tokenizers` file, when one is given

Loading needs neither Lightning nor DeepSpeed. The loader refuses a folder whose tensors do not match its
config and names the first mismatch. Writes go to a temporary sibling folder renamed into place, so an
interrupted export never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrkv.config import ConfigError, ModelConfig, model_config_from_dict
from lrkv.model import Transformer

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
_HF_KEYS = ("model_type", "architectures", "auto_map", "torch_dtype", "transformers_version", "lrkv_format")


class ExportError(ValueError):
    """An export folder that cannot be loaded as it is; the message names the file and the first problem."""


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def config_json(cfg: ModelConfig) -> dict:
    return {"model_type": "lrkv", "architectures": ["LRKVForCausalLM"], "lrkv_format": 1, **dataclasses.asdict(cfg)}


def save_export(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                tokenizer_file: str | Path | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write an export folder atomically (replacing an older export at out_dir only once the new one is complete)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json(cfg), indent=2))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_NAME)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model_config(export_dir: str | Path) -> ModelConfig:
    path = Path(export_dir) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {CONFIG_NAME}; not an lrkv export folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    try:
        return model_config_from_dict({k: v for k, v in data.items() if k not in _HF_KEYS})
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from e


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise ExportError naming the first missing, unexpected or mis-shaped tensor."""
    for name, t in expected.items():
        if name not in found:
            raise ExportError(f"{where}: tensor '{name}' {tuple(t.shape)} required by the config is missing")
        if tuple(found[name].shape) != tuple(t.shape):
            raise ExportError(f"{where}: tensor '{name}' has shape {tuple(found[name].shape)}, "
                              f"the config implies {tuple(t.shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ExportError(f"{where}: tensor '{extra[0]}' is not part of this config's model "
                          f"({len(extra)} unexpected tensor(s))")


def load_export(export_dir: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model from config.json and load model.safetensors into it (eval mode)."""
    export_dir = Path(export_dir)
    cfg = load_model_config(export_dir)
    weights = export_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{export_dir}: no {WEIGHTS_NAME}")
    try:
        found = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{weights}: cannot read safetensors file ({e})") from e
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(model_state_dict(model), found, str(weights))
    model.load_state_dict(found, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device, dtype=dtype).eval()
