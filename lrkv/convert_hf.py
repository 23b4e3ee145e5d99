"""Convert a local Hugging Face Llama / Qwen2 checkpoint, or a llama.cpp GGUF file, into an lrkv export folder.

    python -m lrkv.convert_hf SRC OUT [--dtype bf16|fp16|fp32]

SRC holds `config.json` and `model.safetensors` (or the shards listed in `model.safetensors.index.json`) of a
`LlamaForCausalLM` or `Qwen2ForCausalLM`; `tokenizer.json` and `generation_config.json` (whose eos ids stop
generation) are copied when present, and `tokenizer_config.json` with the chat template (merged in from
`chat_template.jinja`, where transformers 5 saves it). JSON and safetensors are read directly (no transformers
import). The config maps onto `ModelConfig(attn="gqa")`; q/k/v are fused into `attn.qkv` ([q | k | v] rows) and
gate/up into `mlp.fc` ([gate | up] rows). A config field the model cannot reproduce exactly (another architecture, rope
scaling other than llama3, sliding window, biases on Llama, an activation other than silu, ...) is refused
with the field named.

Memory: source tensors are read one at a time with `safe_open`; a fused tensor is built as soon as its last
part is read and its parts are dropped. The converted state dict is the only full copy, so the peak is one model
in the output dtype plus the pending parts of (for layer-ordered shards) one layer: Llama-3-8B in bf16 is
~16.1 GB + <0.3 GB. This needs safetensors >= 0.8, whose `save_file` writes straight from tensor memory; older
versions serialise every tensor to bytes first, a transient second copy.

GGUF (SRC is a `.gguf` file or a folder holding exactly one, general.architecture `llama` or `qwen2`; needs the
`gguf` extra: `pip install 'lrkv[gguf]'`): transformers' GGUF loader dequantises the weights (into --dtype,
default fp32) and rebuilds config, tokenizer.json, chat template and eos ids from the GGUF metadata; the result
goes through the same mapping and checks as a folder. Peak memory: the dequantised model plus one layer's parts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the keys of DTYPES below, for the parser (built before torch loads)


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m lrkv.convert_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="local HF folder (config.json + *.safetensors, + tokenizer.json), or a .gguf file "
                               "or a folder holding one")
    p.add_argument("out", help="lrkv export folder to write (an older export there is replaced atomically)")
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="cast weights (default: keep the checkpoint's dtype; GGUF: dequantise to fp32)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lrkv.config import ConfigError, ModelConfig, model_config_from_dict  # noqa: E402
from lrkv.export import ExportError, check_replaceable, check_state_dict, model_state_dict, save_export  # noqa: E402
from lrkv.model import GroupedQueryAttention, Transformer  # noqa: E402

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_ARCHITECTURES = ("llama", "qwen2")  # general.architecture values transformers loads as the classes above
GGUF_EXTRA = "reading GGUF files needs the gguf and accelerate packages: pip install 'lrkv[gguf]'"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DEFAULTS = {  # transformers' class defaults for fields a config.json may omit
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}


def _qkv(part: str, kind: str) -> tuple[str, int, int]:
    """Where HF's q/k/v projection goes: attn.qkv, in the order the attention module lays out its blocks."""
    parts = GroupedQueryAttention.PROJ_PARTS
    return f"attn.qkv.{kind}", parts.index(part), len(parts)


# HF name inside a layer -> (our name inside the layer, part index, number of parts fused along dim 0)
_LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", 0, 1),
    "post_attention_layernorm.weight": ("mlp_norm.weight", 0, 1),
    "self_attn.q_proj.weight": _qkv("q", "weight"),
    "self_attn.k_proj.weight": _qkv("k", "weight"),
    "self_attn.v_proj.weight": _qkv("v", "weight"),
    "self_attn.q_proj.bias": _qkv("q", "bias"),
    "self_attn.k_proj.bias": _qkv("k", "bias"),
    "self_attn.v_proj.bias": _qkv("v", "bias"),
    "self_attn.o_proj.weight": ("attn.proj.weight", 0, 1),
    "mlp.gate_proj.weight": ("mlp.fc.weight", 0, 2),
    "mlp.up_proj.weight": ("mlp.fc.weight", 1, 2),
    "mlp.down_proj.weight": ("mlp.proj.weight", 0, 1),
}
_TOP_TENSORS = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


class ConvertError(ValueError):
    """A checkpoint this converter cannot turn into an exactly equivalent lrkv model; names the field or tensor."""


def _refuse(field: str, value, why: str) -> None:
    raise ConvertError(f"config.json: {field}={value!r} is not supported: {why}")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # keyed by layer type
        _refuse(field, params, "per-layer-type RoPE parameters")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse("partial_rotary_factor", partial, "RoPE is applied to the whole head")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        _refuse(f"{field}.rope_type", kind, "only 'default' and 'llama3' RoPE are implemented")
    scaling = {"rope_type": "llama3",
               "original_max_position_embeddings": hf.get("max_position_embeddings")}  # HF's fallback
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if params.get(key) is not None:
            scaling[key] = params[key]
        elif scaling.get(key) is None:
            _refuse(f"{field}.{key}", None, "required by llama3 RoPE scaling")
    return theta, scaling


def hf_model_config(hf: dict) -> ModelConfig:
    """Map a Llama/Qwen2 config.json onto ModelConfig, refusing (ConvertError) anything not reproduced exactly."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        _refuse("architectures", archs, f"expected one of {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[archs[0]]
    hf = {**_DEFAULTS[family], **hf}
    if hf.get("quantization_config"):
        _refuse("quantization_config", hf["quantization_config"].get("quant_method"), "quantized weights")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU (silu)")
    if family == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                _refuse(key, hf[key], "only Qwen2's q/k/v biases are implemented")
    else:
        if hf.get("use_sliding_window"):
            _refuse("use_sliding_window", True, "every layer must use full attention")
        other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
        if other:
            _refuse("layer_types", other, "every layer must use full attention")
    try:
        n_head, d_model = hf["num_attention_heads"], hf["hidden_size"]
        theta, scaling = _rope(hf)
        cfg = dict(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=d_model, n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=hf.get("head_dim") or d_model // n_head,
            ffn_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        )
    except KeyError as e:
        raise ConvertError(f"config.json: required field {e.args[0]!r} is missing") from e
    cfg.update(attn="gqa", qkv_bias=family == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
               rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf["rms_norm_eps"]))
    try:
        return model_config_from_dict(cfg)
    except ConfigError as e:
        raise ConvertError(f"config.json: the model it describes has no lrkv equivalent ({e})") from e


def _shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ConvertError(f"{index}: lists {missing[0]}, which is not in the folder ({len(missing)} missing)")
        return shards
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ConvertError(f"{src}: no *.safetensors files (convert .bin checkpoints with transformers first)")
    return shards


def _target(name: str, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """Our tensor name, part index and part count for an HF tensor; None for tensors to skip."""
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return None  # some tied checkpoints store the shared matrix twice
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name], 0, 1
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2).endswith("rotary_emb.inv_freq"):
        return None  # a buffer older checkpoints saved; recomputed from rope_theta
    if m and m.group(2) in _LAYER_TENSORS:
        ours, part, parts = _LAYER_TENSORS[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", part, parts
    raise ConvertError(f"tensor '{name}' has no place in a Llama/Qwen2 lrkv model")


def _folder_tensors(src: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for every tensor of SRC's shards; a tensor is read only when asked for."""
    for shard in _shards(src):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name, partial(f.get_tensor, name)


def map_tensors(tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]], cfg: ModelConfig,
                dtype: torch.dtype | None, where: str) -> dict[str, torch.Tensor]:
    """HF-named tensors -> our layout, checked against cfg's model; dtype None keeps each tensor's own dtype."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}  # fused tensors whose parts may span shards
    for name, read in tensors:
        target = _target(name, cfg)
        if target is None:
            continue
        ours, part, parts = target
        t = read()
        if dtype is not None:
            t = t.to(dtype)
        if parts == 1:
            out[ours] = t
            continue
        pending.setdefault(ours, {})[part] = t
        if len(pending[ours]) == parts:
            group = pending.pop(ours)
            out[ours] = torch.cat([group[i] for i in range(parts)], dim=0)
    if pending:
        name = next(iter(pending))
        raise ConvertError(f"{where}: only {len(pending[name])} HF part(s) of fused tensor '{name}' found; "
                           f"is a shard missing?")
    with torch.device("meta"):
        expected = model_state_dict(Transformer(cfg))
    try:
        check_state_dict(expected, out, where)
    except ExportError as e:
        raise ConvertError(str(e)) from e
    return out


def convert_state_dict(src: Path, cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read SRC's shards tensor by tensor into our layout; dtype None keeps each tensor's own dtype."""
    return map_tensors(_folder_tensors(src), cfg, dtype, str(src))


def _tokenizer_config(data: dict, chat_template: str | None) -> str:
    """tokenizer_config.json with the chat template in it (transformers 5 saves it beside, as chat_template.jinja)."""
    if chat_template and not data.get("chat_template"):
        data["chat_template"] = chat_template
    return json.dumps(data, indent=2)


# ---------------------------------------------------------------------------------------------------------- GGUF


def gguf_source(src: Path) -> Path | None:
    """The GGUF file SRC stands for (SRC itself, or the one .gguf in a folder without config.json), else None."""
    if src.is_file():
        return src if src.suffix.lower() == ".gguf" else None
    if not src.is_dir() or (src / "config.json").is_file():
        return None
    found = sorted(src.glob("*.gguf"))
    if len(found) > 1:
        raise ConvertError(f"{src}: holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                           f"give the one to convert")
    return found[0] if found else None


def gguf_architecture(path: Path) -> str:
    """general.architecture from the GGUF metadata (the tensors are memory-mapped, not read)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ConvertError(f"{path}: {GGUF_EXTRA}") from e
    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, OSError) as e:  # GGUFReader raises ValueError on a bad magic number or version
        raise ConvertError(f"{path}: not a readable GGUF file ({e})") from e
    if field is None:
        raise ConvertError(f"{path}: the GGUF metadata has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode()  # a string field's value (ReaderField layout since gguf 0.10)


def convert_gguf(path: Path, out: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    """Convert a Llama/Qwen2 GGUF file through transformers' GGUF loader (dequantised) into the export OUT."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ConvertError(f"{path}: GGUF general.architecture={arch!r} is not supported: expected one of "
                           f"{list(GGUF_ARCHITECTURES)} (Llama / Qwen2)")
    try:
        check_replaceable(out)  # before the expensive load
    except ExportError as e:
        raise ConvertError(str(e)) from e
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = {"gguf_file": path.name}
    if hasattr(transformers, "GgufConfig"):  # newer transformers can keep GGUF blocks packed: ask for dense weights
        load["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype or torch.float32, **load)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise ConvertError(f"{path}: {GGUF_EXTRA} ({e})") from e
    hf = model.config.to_dict()
    # transformers tags a GGUF-loaded model as gguf-quantised, but the weights it holds are already dequantised
    hf.pop("quantization_config", None)
    hf["architectures"] = [type(model).__name__]
    try:
        cfg = hf_model_config(hf)
    except ConvertError as e:
        raise ConvertError(f"{path} (the config transformers reads from it): {e}") from e
    generation_config = model.generation_config.to_json_string()
    state = model.state_dict()
    del model  # `state` now holds the only references: each tensor is freed once it is mapped
    converted = map_tensors(((name, partial(state.pop, name)) for name in list(state)), cfg, dtype, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = json.loads(Path(tmp, "tokenizer_config.json").read_text())
        for key in ("is_local", "local_files_only"):  # how this load found the temporary folder, nothing more
            data.pop(key, None)
        data["model_max_length"] = cfg.max_seq_len  # GGUF's context_length; transformers leaves a huge sentinel
        tokenizer_config = _tokenizer_config(data, tokenizer.chat_template)
        extra = {"generation_config.json": generation_config, "tokenizer_config.json": tokenizer_config}
        save_export(converted, cfg, out, Path(tmp, "tokenizer.json"), extra)
    return cfg


def convert(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    """Convert the HF folder (or GGUF file) SRC into the lrkv export folder OUT; returns the model config written."""
    src = Path(src)
    gguf = gguf_source(src)
    if gguf is not None:
        return convert_gguf(gguf, out, dtype)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: no config.json and no .gguf file; expected a local Hugging Face model folder "
                           f"or a GGUF file")
    try:
        cfg = hf_model_config(json.loads(config_path.read_text()))
    except ConvertError as e:
        raise ConvertError(f"{src}/{e}") from e
    try:
        check_replaceable(out)  # before converting: e.g. OUT given as SRC by mistake
    except ExportError as e:
        raise ConvertError(str(e)) from e
    state = convert_state_dict(src, cfg, dtype)
    tokenizer = src / "tokenizer.json"
    # generation_config.json: eos ids for generate; the source's tokenizer_config.json keeps its chat template
    kept = [src / name for name in ("generation_config.json", "tokenizer_config.json")]
    extra = {path.name: path.read_text() for path in kept if path.is_file()}
    jinja = src / "chat_template.jinja"
    if "tokenizer_config.json" in extra and jinja.is_file():
        extra["tokenizer_config.json"] = _tokenizer_config(json.loads(extra["tokenizer_config.json"]),
                                                           jinja.read_text())
    save_export(state, cfg, out, tokenizer if tokenizer.is_file() else None, extra)
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        cfg = convert(args.src, args.out, DTYPES.get(args.dtype))
    except ConvertError as e:
        sys.exit(f"convert_hf: {e}")
    scaling = f", llama3 rope x{cfg.rope_scaling['factor']}" if cfg.rope_scaling else ""
    print(f"{args.src} -> {args.out}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads / "
          f"{cfg.n_kv_head} KV heads x {cfg.dh}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, "
          f"rope_theta {cfg.rope_theta:g}{scaling}, tied {cfg.tie_embeddings}, qkv_bias {cfg.qkv_bias}")


if __name__ == "__main__":
    main()
