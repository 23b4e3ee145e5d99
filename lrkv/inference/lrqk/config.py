"""LRQK decoder settings: the budget (sinks + recent + top_k rows attended per step and stream), the selection
policy that picks the top_k, and the low-rank proxy's knobs (spec lrqk.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, replace

PRESETS = {"paper": (32, 2048, 64), "memory": (16, 1024, 32), "accuracy": (64, 4096, 128)}  # rank, top_k, recent
# lrqk = the paper's low-rank proxy; the others are its peers (../shared/specs/peers.md), same budget and cache
POLICIES = ("lrqk", "exact", "streaming", "h2o", "quest", "loki")


def context_top_k(length: int) -> int:
    """The paper's advice (spec lrqk.md §4): 256 up to 4K tokens, 1024 up to 16K, 2048 beyond."""
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
    # LRKV: "shared" (spec §7 P1) or "per_head" (P0). mha/gqa/mqa: per query head as the reference ("shared" or
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
