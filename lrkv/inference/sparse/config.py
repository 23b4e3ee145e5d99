"""Sparse decoding settings: the budget every policy shares (sinks + recent + top_k rows attended per step and
selection stream), which policy fills the top_k and that policy's own knobs (its `Knobs` dataclass, registry.py),
presets, and the one way a command line exposes them (add_sparse_args, sparse_config). Imports no torch: parsers
use it before --help is answered; the knobs classes are looked up when a config is resolved."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lrkv.inference.sparse.registry import POLICIES, policy_class

PRESETS = {"paper": (32, 2048, 64), "memory": (16, 1024, 32), "accuracy": (64, 4096, 128)}  # rank, top_k, recent
PROXIES = ("shared", "per_head", "group")


def context_top_k(length: int) -> int:
    """The paper's advice (docs/lrqk.md §4): 256 up to 4K tokens, 1024 up to 16K, 2048 beyond."""
    return 256 if length <= 4096 else 1024 if length <= 16384 else 2048


@dataclass
class SparseConfig:
    policy: str = "lrqk"  # which tokens fill the top_k budget: a name in registry.POLICIES
    knobs: Any = None  # the policy's own settings (an instance of its Knobs dataclass); None: that policy's defaults
    top_k: int | None = None  # None: chosen from the prompt length (context_top_k), as the paper scales it
    recent: int = 64  # includes the token being decoded, so >= 1
    sinks: int = 0
    # how selections are shared. mha/gqa/mqa: one per query head as LRQK's reference ("shared" or "per_head"), or
    # "group": one selection and GPU slot set per KV head (each missing row moves once). lrkv: one selection per row;
    # LRQK's proxy per layer ("shared", docs/lrqk.md §7 P1) or per head ("per_head", P0)
    proxy: str = "shared"
    gpu_capacity: int | None = None  # resident rows per selection stream; default top_k + recent + sinks
    sparse_query_tail: int = 0  # last N prompt tokens go through the sparse decode path instead of exact prefill
    dense_layers: int = 0  # the first N layers attend every row (Quest's protocol keeps two)
    measure_recall: bool = False  # also compute the exact top-k each step; stats.recall per layer
    seed: int = 0  # randomised policy state (LRQK's ALS init)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SparseConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}', expected one of {sorted(PRESETS)}")
        rank, top_k, recent = PRESETS[name]
        return cls(**{"top_k": top_k, "recent": recent, **overrides}).tuned(rank=rank)

    @classmethod
    def full(cls, capacity: int) -> "SparseConfig":
        """Exact attention through the engine: every row of up to `capacity` tokens selected, one slot set per KV
        head (mha/gqa/mqa) or per row (lrkv), so each row is held once."""
        return cls(policy="full", top_k=capacity, recent=1, proxy="group")

    def resolved(self) -> "SparseConfig":
        """This config with the policy's default knobs filled in; refuses knobs of another policy."""
        kind = policy_class(self.policy).Knobs
        if self.knobs is None:
            return replace(self, knobs=kind())
        if type(self.knobs) is not kind:
            raise ValueError(f"policy '{self.policy}' takes {kind.__qualname__} knobs, "
                             f"got {type(self.knobs).__qualname__}")
        return self

    def tuned(self, **fields) -> "SparseConfig":
        """This config with those knob fields set that the policy's knobs have (e.g. rank for lrqk and loki; a
        command line's --rank leaves Quest alone)."""
        cfg = self.resolved()
        own = {f.name for f in dataclasses.fields(cfg.knobs)}
        return replace(cfg, knobs=replace(cfg.knobs, **{k: v for k, v in fields.items() if k in own}))

    def with_policy(self, name: str, **fields) -> "SparseConfig":
        """The same budget with policy `name`; knob fields the two policies share (rank) carry over."""
        shared = dataclasses.asdict(self.resolved().knobs)
        return replace(self, policy=name, knobs=None).tuned(**{**shared, **fields})

    def for_context(self, length: int) -> "SparseConfig":
        """This config with top_k set for a prompt of `length` tokens when it was left to the context."""
        return self if self.top_k is not None else replace(self, top_k=context_top_k(length))

    @property
    def slots(self) -> int:
        if self.top_k is None:
            raise ValueError("SparseConfig.top_k is chosen per context: call for_context(length) first")
        return self.gpu_capacity if self.gpu_capacity is not None else self.top_k + self.recent + self.sinks

    def layer_budget(self, index: int, capacity: int) -> tuple[int, int]:
        """(top_k, GPU slots per stream) of layer `index` for up to `capacity` tokens: a dense layer selects and
        holds every row."""
        if index < self.dense_layers:
            return capacity, capacity + self.recent + self.sinks
        return self.top_k, self.slots

    def validate(self, head_dim: int) -> None:
        top_k = self.top_k or 1  # None (per context) is always valid
        rules = [
            (self.policy in POLICIES, f"policy must be one of {', '.join(POLICIES)}, got '{self.policy}'"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.recent >= 1, f"recent must be >= 1 (the window holds the current token), got {self.recent}"),
            (self.sinks >= 0, f"sinks must be >= 0, got {self.sinks}"),
            (self.proxy in PROXIES, f"proxy must be one of {', '.join(PROXIES)}, got '{self.proxy}'"),
            (self.gpu_capacity is None or self.gpu_capacity >= top_k + self.recent + self.sinks,
             f"gpu_capacity {self.gpu_capacity} < top_k + recent + sinks = {top_k + self.recent + self.sinks}"),
            (self.sparse_query_tail >= 0, f"sparse_query_tail must be >= 0, got {self.sparse_query_tail}"),
            (self.dense_layers >= 0, f"dense_layers must be >= 0, got {self.dense_layers}"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"SparseConfig: {message}")
        for message in self.resolved().knobs.problems(head_dim):
            raise ValueError(f"SparseConfig: {self.policy} {message}")

    def summary(self) -> str:
        """One line for logs and report titles."""
        knobs = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self.resolved().knobs).items())
        return (f"policy {self.policy}{f' ({knobs})' if knobs else ''}, top-k {self.top_k}, recent {self.recent}, "
                f"sinks {self.sinks}, proxy {self.proxy}")


# ---------------------------------------------------------------------------------------------------- command lines
# the settings a command line may expose: (type, --help text; the default is appended). rank is a knob: it sets the
# rank of every policy that has one (lrqk, loki)
FLAGS: dict[str, tuple[type, str]] = {
    "rank": (int, "LRQK's proxy rank r and Loki's PCA rank"),
    "top_k": (int, "selected tokens per step and stream"),
    "recent": (int, "recent window W, always attended"),
    "sinks": (int, "first tokens always attended"),
    "policy": (str, f"which tokens fill top-k: LRQK's proxy or a peer ({', '.join(POLICIES)})"),
    "proxy": (str, "shared (lrkv: per layer; mha/gqa: per query head), per_head, or group (one per KV head)"),
    "sparse_query_tail": (int, "feed the last N prompt tokens through sparse decode"),
}
KNOB_FLAGS = ("rank",)
# what a None default means
UNSET = {"top_k": "chosen from the prompt length: 256 up to 4K tokens, 1024 up to 16K, 2048 beyond",
         "rank": "32"}


def _comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def add_sparse_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: Mapping[str, object],
                    sweep: Collection[str] = (), preset: bool = False, unset: Mapping[str, str] | None = None) -> None:
    """Add a flag per setting in `defaults` (a key of FLAGS), in its order, with this entry point's default.
    A default of None leaves the flag unset: sparse_config then keeps the preset's or the base config's value, and
    --help says what that is (`unset`, else SparseConfig's default). A field in `sweep` takes a comma list under a
    plural flag (--ranks, --top-ks, --policies) that the command iterates; sparse_config skips it. preset: add
    --lrqk-preset first; rank, top_k and recent then need the None default, or the preset could never apply."""
    if preset:
        assert all(defaults.get(f) is None for f in ("rank", "top_k", "recent")), "a preset needs unset defaults"
        values = "; ".join(f"{name} {'/'.join(map(str, v))}" for name, v in sorted(PRESETS.items()))
        parser.add_argument("--lrqk-preset", choices=sorted(PRESETS),
                            help=f"rank/top-k/recent: {values} (explicit flags override it)")
    said = {**UNSET, **(unset or {})}
    for field, default in defaults.items():
        kind, text = FLAGS[field]
        if field in sweep:
            plural = "policies" if field == "policy" else f"{field}s"
            parser.add_argument(f"--{plural.replace('_', '-')}", default=default, type=_comma_list(kind),
                                help=f"{text}, a comma list swept (default %(default)s)")
            continue
        note = "%(default)s" if default is not None else said.get(field, str(getattr(SparseConfig, field, None)))
        parser.add_argument(f"--{field.replace('_', '-')}", default=default, type=kind,
                            choices=list(POLICIES) if field == "policy" else None, help=f"{text} (default {note})")
    parser.set_defaults(sparse_flags=tuple(f for f in defaults if f not in sweep))


def sparse_config(args: argparse.Namespace, base: SparseConfig | None = None) -> SparseConfig:
    """The SparseConfig that add_sparse_args' flags describe: --lrqk-preset through SparseConfig.preset(), else `base`
    (the entry point's settings without a preset; default SparseConfig()), and every flag given overrides either.
    Swept fields keep the base value. Validated where the model is known (the decoder)."""
    given = {f: getattr(args, f) for f in args.sparse_flags if getattr(args, f) is not None}
    knobs = {f: given.pop(f) for f in KNOB_FLAGS if f in given}
    policy = given.pop("policy", None)
    name = getattr(args, "lrqk_preset", None)
    cfg = SparseConfig.preset(name, **given) if name else replace(base or SparseConfig(), **given)
    if policy is not None and policy != cfg.policy:
        cfg = cfg.with_policy(policy)
    return cfg.tuned(**knobs) if knobs else cfg
