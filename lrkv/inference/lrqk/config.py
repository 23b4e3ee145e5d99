"""LRQK decoder settings: the budget (sinks + recent + top_k rows attended per step and stream), the selection
policy that picks the top_k, and the low-rank proxy's knobs (docs/lrqk.md §4); and the one way a command line
exposes them (add_lrqk_args, lrqk_config). Imports no torch: parsers use it before --help is answered."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

PRESETS = {"paper": (32, 2048, 64), "memory": (16, 1024, 32), "accuracy": (64, 4096, 128)}  # rank, top_k, recent
# lrqk = the paper's low-rank proxy; the others are its peers (docs/peers.md), same budget and cache
POLICIES = ("lrqk", "exact", "streaming", "h2o", "quest", "loki")


def context_top_k(length: int) -> int:
    """The paper's advice (docs/lrqk.md §4): 256 up to 4K tokens, 1024 up to 16K, 2048 beyond."""
    return 256 if length <= 4096 else 1024 if length <= 16384 else 2048


@dataclass
class LRQKConfig:
    rank: int = 32  # LRQK proxy rank; Loki's PCA rank
    top_k: int | None = None  # None: chosen from the prompt length (context_top_k), as the paper scales it
    recent: int = 64  # includes the token being decoded, so >= 1
    sinks: int = 0
    policy: str = "lrqk"  # which tokens fill the top_k budget: one of POLICIES ("exact" = oracle q.k scores)
    prefill_iters: int = 2
    decode_iters: int = 2
    tol: float = 1e-2
    # LRKV: "shared" (docs/lrqk.md §7 P1) or "per_head" (P0). mha/gqa/mqa: per query head as the reference ("shared" or
    # "per_head"), or "group": one proxy, selection and GPU slot set per KV head (each missing row moves once)
    proxy: str = "shared"
    gpu_capacity: int | None = None  # resident rows per pool stream; default top_k + recent + sinks
    sparse_query_tail: int = 0  # last N prompt tokens go through the sparse decode path instead of exact prefill
    measure_recall: bool = False  # also compute the exact top-k each step; stats["recall"] per layer
    seed: int = 0  # ALS random init

    @classmethod
    def preset(cls, name: str, **overrides) -> "LRQKConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LRQK preset '{name}', expected one of {sorted(PRESETS)}")
        rank, top_k, recent = PRESETS[name]
        return cls(**{"rank": rank, "top_k": top_k, "recent": recent, **overrides})

    def for_context(self, length: int) -> "LRQKConfig":
        """This config with top_k set for a prompt of `length` tokens when it was left to the context."""
        return self if self.top_k is not None else replace(self, top_k=context_top_k(length))

    @property
    def slots(self) -> int:
        if self.top_k is None:
            raise ValueError("LRQKConfig.top_k is chosen per context: call for_context(length) first")
        return self.gpu_capacity if self.gpu_capacity is not None else self.top_k + self.recent + self.sinks

    def validate(self, head_dim: int) -> None:
        top_k = self.top_k or 1  # None (per context) is always valid
        rules = [
            (1 <= self.rank <= head_dim, f"rank must be in [1, head_dim={head_dim}], got {self.rank}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.recent >= 1, f"recent must be >= 1 (the window holds the current token), got {self.recent}"),
            (self.sinks >= 0, f"sinks must be >= 0, got {self.sinks}"),
            (self.policy in POLICIES, f"policy must be one of {', '.join(POLICIES)}, got '{self.policy}'"),
            (self.prefill_iters >= 0 and self.decode_iters >= 1,
             f"need prefill_iters >= 0 and decode_iters >= 1, got {self.prefill_iters}, {self.decode_iters}"),
            (self.proxy in ("shared", "per_head", "group"),
             f"proxy must be 'shared', 'per_head' or 'group', got '{self.proxy}'"),
            (self.gpu_capacity is None or self.gpu_capacity >= top_k + self.recent + self.sinks,
             f"gpu_capacity {self.gpu_capacity} < top_k + recent + sinks = {top_k + self.recent + self.sinks}"),
            (self.sparse_query_tail >= 0, f"sparse_query_tail must be >= 0, got {self.sparse_query_tail}"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"LRQKConfig: {message}")

    def summary(self) -> str:
        """One line for logs and report titles."""
        return (f"policy {self.policy}, rank {self.rank}, top-k {self.top_k}, recent {self.recent}, "
                f"sinks {self.sinks}, proxy {self.proxy}")


# ---------------------------------------------------------------------------------------------------- command lines
# the LRQKConfig fields a command line may expose: (type, --help text; the default is appended)
FLAGS: dict[str, tuple[type, str]] = {
    "rank": (int, "Loki's PCA rank and LRQK's proxy rank r"),
    "top_k": (int, "selected tokens per step and stream"),
    "recent": (int, "recent window W, always attended"),
    "sinks": (int, "first tokens always attended"),
    "policy": (str, f"which tokens fill top-k: LRQK's proxy or a peer ({', '.join(POLICIES)})"),
    "proxy": (str, "shared (lrkv: per layer; mha/gqa: per query head), per_head, or group (one per KV head)"),
    "sparse_query_tail": (int, "feed the last N prompt tokens through sparse decode"),
}
# what LRQKConfig's None default means
UNSET = {"top_k": "chosen from the prompt length: 256 up to 4K tokens, 1024 up to 16K, 2048 beyond"}


def _comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def add_lrqk_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: Mapping[str, object],
                  sweep: Collection[str] = (), preset: bool = False, unset: Mapping[str, str] | None = None) -> None:
    """Add a flag per LRQKConfig field in `defaults` (a key of FLAGS), in its order, with this entry point's default.
    A default of None leaves the flag unset: lrqk_config then keeps the preset's or the base config's value, and
    --help says what that is (`unset`, else LRQKConfig's default). A field in `sweep` takes a comma list under a
    plural flag (--ranks, --top-ks, --policies) that the command iterates; lrqk_config skips it. preset: add
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
        note = "%(default)s" if default is not None else said.get(field, str(getattr(LRQKConfig, field)))
        parser.add_argument(f"--{field.replace('_', '-')}", default=default, type=kind,
                            choices=POLICIES if field == "policy" else None, help=f"{text} (default {note})")
    parser.set_defaults(lrqk_flags=tuple(f for f in defaults if f not in sweep))


def lrqk_config(args: argparse.Namespace, base: LRQKConfig | None = None) -> LRQKConfig:
    """The LRQKConfig that add_lrqk_args' flags describe: --lrqk-preset through LRQKConfig.preset(), else `base` (the
    entry point's settings without a preset; default LRQKConfig()), and every flag given overrides either. Swept
    fields keep the base value. Validated where the model is known (the decoder: config.py's messages)."""
    given = {f: getattr(args, f) for f in args.lrqk_flags if getattr(args, f) is not None}
    name = getattr(args, "lrqk_preset", None)
    return LRQKConfig.preset(name, **given) if name else replace(base or LRQKConfig(), **given)
