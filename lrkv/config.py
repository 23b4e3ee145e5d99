"""Typed run configuration: dataclasses, YAML in and out, dotted CLI overrides, validation.

    cfg = load_config("lrkv_debug.yaml", ["--model.rank_k=16", "--train.max_steps", "40"])

A YAML file may start from another with `inherit: other.yaml` (resolved next to it, then in configs/) and
override only what differs, so a baseline config states just its attention change.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# configs/*.yaml: beside the package in a checkout, inside it (lrkv/configs/, pyproject's package-dir) once installed
_PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
ATTENTION_TYPES = ("mha", "gqa", "mqa", "mla", "lrkv")
HEAD_DIMS = (16, 32, 64, 128, 256)
# Lightning's precision strings and their aliases (tests/test_config.py checks they agree), checked before it loads
PRECISIONS = ("auto", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "bf16", "16", "32", "64")
PATH_KEYS = ("data.source", "data.tokenizer", "run.dir", "run.resume")  # file or folder names (None: not given)


class ConfigError(ValueError):
    """A config problem, with the dotted key that caused it."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # embedding rows; >= the tokenizer's vocabulary
    n_layer: int = 4  # transformer blocks
    d_model: int = 128  # residual width
    n_head: int = 4  # query heads
    head_dim: int | None = None  # None: d_model // n_head
    attn: str = "lrkv"  # one of ATTENTION_TYPES
    n_kv_head: int | None = None  # gqa groups; None: n_head for mha/lrkv/mla, 1 for mqa
    rank_k: int = 8  # lrkv per-head key residual rank
    rank_v: int = 8  # lrkv per-head value residual rank
    lrkv_b_init: str = "zero"  # zero (step 0 is exactly MQA) | normal
    mla_kv_rank: int = 64  # d_c, compressed KV latent
    mla_q_rank: int = 0  # d_c', compressed query latent; 0 = direct query projection
    mla_rope_dim: int = 16  # d_R, decoupled RoPE dim shared by heads
    ffn_dim: int = 384  # SwiGLU hidden size
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2-style q/k/v biases (imported checkpoints)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # Llama-3 style: {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 256  # longest sequence (RoPE, exports' model_max_length)
    init_std: float = 0.02  # normal init std of the projections (output projections scaled by 1/sqrt(2 n_layer))
    attn_impl: str = "torch"  # torch (reference) | rebuild (rebuild-once, lean backward) | triton (fused kernel)

    @property
    def dh(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        if self.attn == "mqa":
            return 1
        if self.attn == "gqa":
            return self.n_kv_head
        return self.n_head


@dataclass
class DataConfig:
    source: str = "shakespeare"  # shakespeare (embedded) | path to .txt/.json/.jsonl/.parquet file or folder | hf:NAME[:CONFIG]
    text_field: str = "text"  # field holding the text in .json/.jsonl/.parquet/hub datasets
    text_sample_by: str = "document"  # .txt files: one document per file | paragraph | line
    seq_len: int = 128  # training sequence length (<= model.max_seq_len)
    val_fraction: float = 0.01  # share of documents held out for validation
    tokenizer: str | None = None  # path to tokenizer.json; None: train a byte-level BPE of vocab_size on the corpus
    tokenizer_train_chars: int = 20_000_000  # characters used to train the tokenizer
    streaming: bool = False  # stream hub datasets instead of downloading


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    micro_batch_size: int = 16  # sequences per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr
    weight_decay: float = 0.1  # AdamW decay of the weight matrices (embedding, norms and biases exempt)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 20  # linear warm-up steps
    decay_fraction: float = 0.2  # wsd: final share of steps spent decaying
    grad_clip: float = 1.0  # clip the global grad norm to this
    precision: str = "auto"  # auto (bf16-mixed on CUDA, 32-true on CPU) | any Lightning precision string
    seed: int = 1337  # weights and data order
    val_every: int = 100  # validate every N optimizer steps
    val_batches: int = 8  # micro-batches per validation
    ckpt_every: int = 100  # write step-N.ckpt every N optimizer steps
    keep_last: int = 2  # step-N.ckpt files kept (plus last.ckpt)
    activation_checkpointing: bool = False  # recompute each block in the backward (less memory, ~1/3 more compute)


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | single | ddp | deepspeed
    accelerator: str = "auto"  # auto | cpu | cuda
    devices: int | str = "auto"  # devices per node (auto: all, or what the launcher gives)
    num_nodes: int = 1  # nodes (must agree with the launcher)
    deepspeed: dict = field(default_factory=dict)  # full DeepSpeed config (zero_optimization, offload, ...)


@dataclass
class LogConfig:
    every: int = 10  # log line / metrics every N optimizer steps
    csv: bool = True  # csv/ metrics log
    tensorboard: bool = True  # tensorboard/ logs
    wandb: bool = False  # Weights & Biases logger (needs the wandb package)
    wandb_project: str = "lrkv"  # W&B project name
    progress_bar: bool = True  # progress bar on a terminal (plain log lines otherwise)


@dataclass
class RunConfig:
    dir: str = "runs/debug"  # run folder: config, tokenizer, data cache, checkpoints, logs, export
    resume: str | None = None  # None | auto | path to a checkpoint
    export: bool = True  # write <dir>/export at the end of training
    sample_prompt: str = "ROMEO:"  # prompt of the greedy sample after training
    sample_tokens: int = 64  # tokens of that sample


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------- building


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML scalars to the field's type where safe (int -> float), else raise naming the key."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: must not be null")
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict, list) and isinstance(value, base):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, known)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else the same name under configs/."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / path.name
    if candidate.is_file():
        return candidate
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file '{name}' not found (also looked in {CONFIG_DIR}); shipped configs: {shipped}")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(name: str | Path, _seen: tuple = ()) -> dict:
    path = resolve_config_path(name)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'inherit' cycle through {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("inherit", None)
    if parent is not None:
        parent_path = path.parent / parent if (path.parent / parent).is_file() else parent
        data = _deep_merge(read_yaml(parent_path, _seen + (path.resolve(),)), data)
    return data


def parse_overrides(args: list[str]) -> dict:
    """['--model.rank_k=16', '--train.lr', '1e-3'] -> {'model': {'rank_k': 16}, 'train': {'lr': 0.001}}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"override '{arg}': expected --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value")
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(f"override '--{key}': expected --section.key (sections: {[f.name for f in fields(Config)]})")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        # YAML scalars: 32 -> int, 1e-3 -> float, true -> bool, null -> None, {a: 1} -> dict
        value = yaml.safe_load(raw) if raw else ""
        if not isinstance(value, (str, int, float, bool, dict, list, type(None))):
            value = raw  # e.g. YAML would read 2026-01-01 as a date
        node[parts[-1]] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = read_yaml(path) if path is not None else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = _build(ModelConfig, data, "model")
    validate_model(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}")


def validate_model(m: ModelConfig) -> None:
    _require(m.attn in ATTENTION_TYPES, "model.attn", f"unknown attention type '{m.attn}', expected one of {ATTENTION_TYPES}")
    for key in ("vocab_size", "n_layer", "d_model", "n_head", "ffn_dim", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    if m.head_dim is None:
        _require(m.d_model % m.n_head == 0, "model.d_model",
                 f"d_model {m.d_model} is not divisible by n_head {m.n_head}; set model.head_dim explicitly")
    _require(m.dh in HEAD_DIMS, "model.head_dim", f"must be one of {HEAD_DIMS}, got {m.dh}")
    if m.attn == "gqa":
        _require(m.n_kv_head is not None, "model.n_kv_head", "gqa needs n_kv_head (number of KV groups)")
        _require(0 < m.n_kv_head <= m.n_head and m.n_head % m.n_kv_head == 0, "model.n_kv_head",
                 f"must divide n_head {m.n_head}, got {m.n_kv_head}")
    elif m.n_kv_head is not None:
        expected = 1 if m.attn == "mqa" else m.n_head
        _require(m.n_kv_head == expected, "model.n_kv_head", f"{m.attn} fixes n_kv_head to {expected}, got {m.n_kv_head}")
    if m.attn == "lrkv":
        for key in ("rank_k", "rank_v"):
            r = getattr(m, key)
            _require(0 <= r <= m.dh, f"model.{key}", f"rank must be in [0, head_dim={m.dh}], got {r}")
        _require(m.lrkv_b_init in ("zero", "normal"), "model.lrkv_b_init", f"zero or normal, got '{m.lrkv_b_init}'")
    if m.attn == "mla":
        _require(m.mla_kv_rank > 0, "model.mla_kv_rank", f"must be > 0, got {m.mla_kv_rank}")
        _require(m.mla_q_rank >= 0, "model.mla_q_rank", f"must be >= 0 (0 = direct query), got {m.mla_q_rank}")
        _require(m.mla_rope_dim > 0 and m.mla_rope_dim % 2 == 0, "model.mla_rope_dim",
                 f"must be a positive even number, got {m.mla_rope_dim}")
    _require(m.attn_impl in ("torch", "rebuild", "triton"), "model.attn_impl",
             f"torch, rebuild or triton, got '{m.attn_impl}'")
    _require(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
        _require(kind == "llama3", "model.rope_scaling.rope_type", f"only 'llama3' is supported, got {kind!r}")
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _require(key in m.rope_scaling, f"model.rope_scaling.{key}", "required for llama3 scaling")


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value is None or value.strip() != "", key,
                 f"must not be empty (it would mean the current folder), got {value!r}")
    d, t, s = cfg.data, cfg.train, cfg.strategy
    _require(0 < d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
             f"must be in [1, model.max_seq_len={cfg.model.max_seq_len}], got {d.seq_len}")
    _require(d.text_sample_by in ("document", "paragraph", "line"), "data.text_sample_by",
             f"document, paragraph or line, got '{d.text_sample_by}'")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    for key in ("max_steps", "micro_batch_size", "grad_accum", "val_every", "val_batches", "ckpt_every", "keep_last"):
        _require(getattr(t, key) > 0, f"train.{key}", f"must be > 0, got {getattr(t, key)}")
    _require(t.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}, got '{t.precision}'")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.schedule in ("wsd", "cosine", "constant"), "train.schedule", f"wsd, cosine or constant, got '{t.schedule}'")
    _require(0 <= t.warmup_steps < t.max_steps, "train.warmup_steps",
             f"must be in [0, max_steps={t.max_steps}), got {t.warmup_steps}")
    _require(0.0 <= t.decay_fraction <= 1.0, "train.decay_fraction", f"must be in [0, 1], got {t.decay_fraction}")
    _require(s.name in ("auto", "single", "ddp", "deepspeed"), "strategy.name",
             f"auto, single, ddp or deepspeed, got '{s.name}'")
    _require(s.accelerator in ("auto", "cpu", "cuda", "gpu"), "strategy.accelerator", f"auto, cpu or cuda, got '{s.accelerator}'")
    _require(s.num_nodes >= 1, "strategy.num_nodes", f"must be >= 1, got {s.num_nodes}")
    devices_ok = s.devices >= 1 if isinstance(s.devices, int) else re.fullmatch(r"auto|[1-9]\d*|\d+(,\d*)+", s.devices)
    _require(bool(devices_ok), "strategy.devices",
             f"auto, a device count >= 1 or device indices like '0,1', got {s.devices!r}")
    _require(cfg.log.every > 0, "log.every", f"must be > 0, got {cfg.log.every}")
    # the sample after training: checked now, not after the whole run
    _require(cfg.run.sample_tokens > 0, "run.sample_tokens", f"must be > 0, got {cfg.run.sample_tokens}")
    _require(cfg.run.sample_prompt != "", "run.sample_prompt", "must not be empty (the sample continues it)")


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field of a config dataclass: the documentation --help prints."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2] for m in (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for line in lines) if m}


def config_help(usage: str, description: str, options: str = "") -> str:
    """--help text: usage, description, the program's own options, then every config field as --section.key."""
    out = [f"usage: {usage}", "", description, ""]
    if options:
        out += ["options:", options, ""]
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    out += ["config:", f"  --config FILE   a YAML config (a path, or a name in {CONFIG_DIR}: {shipped});",
            "                  then any field below as --section.key=value (or --section.key value), YAML scalars"]
    hints = typing.get_type_hints(Config)
    for section in fields(Config):
        cls = hints[section.name]
        notes, defaults, types_ = _field_comments(cls), cls(), typing.get_type_hints(cls)
        out += ["", f"{section.name}:"]
        for f in fields(cls):
            kind = getattr(types_[f.name], "__name__", str(types_[f.name]).replace("typing.", ""))
            line = f"  --{section.name}.{f.name}={getattr(defaults, f.name)!r}  ({kind})"
            out.append(f"{line}  {notes[f.name]}" if f.name in notes else line)
    return "\n".join(out)


def parse_cli(argv: list[str], usage: str = "python -m lrkv.config --config FILE [--section.key=value ...]",
              description: str = "Print the resolved config as YAML.", options: str = "") -> Config:
    """`--config X [--section.key=value ...]` (also `--config=X`) -> validated Config; -h/--help prints
    config_help(usage, description, options) and exits."""
    if "-h" in argv or "--help" in argv:
        print(config_help(usage, description, options))
        sys.exit(0)
    argv, path = list(argv), None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            path = argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            del argv[i]
            break
    return load_config(path, argv)


def main(argv: list[str] | None = None) -> None:
    """python -m lrkv.config --config X [overrides]: print the resolved config as YAML."""
    try:
        print(parse_cli(sys.argv[1:] if argv is None else argv).to_yaml(), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
