"""What a selection policy is and what it may read. A policy decides which `top_k` older tokens each selection
stream attends at a step, beside the sinks and recent window the engine keeps; the engine owns the row store, the
GPU slot pool, hit/miss accounting, exact attention over the selected rows and the memory plan. Definitions and the
shared budget: docs/peers.md §1-2. Each policy lives in policies/<name>.py and is named in registry.py.

Layouts a policy receives (all post-RoPE):
    q    (B, H, n, D) the queries of n tokens (n = 1 at a decode step)
    k    (B, Hk, n, D) their keys, query head h reading key head h // (H / Hk): GQA's KV heads are not repeated; for
         lrkv every head's rebuilt key (Hk = H)
    kv   the attention module's raw payload of those tokens (lrkv's shared_key reads it)
    keep (B, T) float, 1 for real prompt tokens, or None when no row is padded
Scores come back as (selection streams, m, L): m heads per stream (1 per query head, the KV group for proxy
"group", H for an lrkv row); `select_top_k` ranks max_h (s_h - max s_h) over the candidates, the same aggregation
for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.store import RowStore, SlotPool


def qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scores q (B, H, m, D) . k (B, Hk, n, D) -> (B, H, m, n) fp32; query head h reads key head h // (H / Hk)."""
    B, H, m, D = q.shape
    Hk = k.shape[1]
    # a group's query heads as rows of one matmul per KV head: broadcasting k over them would copy k per head
    return (q.float().reshape(B, Hk, H // Hk * m, D) @ k.float().mT).view(B, H, m, -1)


def max_over_heads(scores: torch.Tensor) -> torch.Tensor:
    """(S, m, L) -> (S, L): max_h (s_h(j) - max_j' s_h(j')), how a stream of m heads ranks its tokens (docs/lrqk.md §7);
    with one head its scores (subtracting its max changes no ranking)."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    return (scores - scores.amax(-1, keepdim=True)).amax(1)


def select_top_k(scores: torch.Tensor, candidate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (S, m, L) per head, candidate (S, L) bool -> ids (S, k'), ok (S, k') of the top-k tokens by
    max_h (s_h(j) - max_j' s_h(j')) over candidates (docs/lrqk.md §7; with m = 1 plain per-head top-k)."""
    if k >= scores.shape[-1]:  # every candidate fits (e.g. full attention as a policy): no ranking needed
        ids = torch.arange(scores.shape[-1], device=scores.device).expand_as(candidate)
        return torch.where(candidate, ids, -1), candidate
    # non-candidates at the dtype's lowest finite value first, so that they cannot set a head's max
    s = max_over_heads(scores.masked_fill(~candidate[:, None], torch.finfo(scores.dtype).min))
    s = s.masked_fill(~candidate, float("-inf"))
    vals, ids = s.topk(min(k, s.shape[-1]), dim=-1)
    ok = vals > float("-inf")
    return torch.where(ok, ids, -1), ok


@dataclass(frozen=True)
class LayerView:
    """The narrow, read-only view of one layer that its policy gets: shapes, devices, and the stored and resident
    rows read through the attention module's own description (never the engine's layer object)."""

    geo: Geometry
    layer: int  # the layer's index in the model
    top_k: int  # the shared budget per stream (SparseConfig, top_k resolved for the prompt): selected tokens,
    recent: int  # the recent window and
    sinks: int  # the first tokens the engine keeps besides them
    device: torch.device
    dtype: torch.dtype  # the model's (and the row store's) dtype
    head_dim: int
    module: torch.nn.Module  # the attention module: keys_values, shared_key (lrkv)
    store: RowStore
    pool: SlotPool
    generator: torch.Generator  # for randomised fits (LRQK's ALS init), seeded per decoder

    def keys_values(self, rows: torch.Tensor, positions: torch.Tensor, values: bool = True):
        """Rows (store or pool streams, n, row) at token positions (streams, n) -> K, V (B, Hk, n, D) as `k` above;
        V None if not asked."""
        B, n = self.geo.batch, rows.shape[1]
        return self.module.keys_values(rows.view(B, -1, n, rows.shape[2]), positions.reshape(B, -1, n), values)

    def leading_keys_values(self, rows: torch.Tensor, values: bool = False):
        """K (and V if asked) (B, Hk, n, D) of rows (streams, n, row) holding tokens 0..n-1 (the prompt's rows, the
        store's first n): GQA's KV heads (never repeated per query head), every head's rebuilt key for LRKV."""
        n = rows.shape[1]
        return self.keys_values(rows, torch.arange(n, device=rows.device).expand(len(rows), n), values)

    def stored_keys_values(self, length: int, values: bool = False):
        """Every stored token's exact K (and V if asked) (B, Hk, length, D), read from the whole row store."""
        self.store.ready()
        return self.leading_keys_values(self.store.rows[:, :length].to(self.device), values)

    def resident_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The GPU pool's token ids (S, C) (clamped to 0 where empty), the resident mask (S, C) and their keys
        (B, Hk, C, D)."""
        tokens = self.pool.token
        k, _ = self.keys_values(self.pool.slots, tokens.clamp(min=0), values=False)
        return tokens.clamp(min=0), tokens >= 0, k

    def exact_scores(self, q: torch.Tensor, length: int) -> torch.Tensor:
        """Oracle: true q_h . k_h(j) for every stored token (selection streams, heads, length); reads the whole store
        once (query heads of a group share their store stream's keys)."""
        k, _ = self.stored_keys_values(length)
        return self.geo.streams(qk(q, k)[:, :, 0])


class Policy:
    """One layer's selection state. Subclasses set `Knobs` (a dataclass of their own settings, with `problems`) and
    `state_bytes` (what they keep on the GPU, for the memory plan) and implement `prefill` and `step`."""

    wants_weights = False  # True: the engine passes each step's attention weights to observe()

    @dataclass(frozen=True)
    class Knobs:
        def problems(self, head_dim: int) -> list[str]:
            return []

    def __init__(self, view: LayerView, knobs, capacity: int):
        self.view, self.knobs = view, knobs

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        """GPU bytes of one layer's state for up to `length` tokens (elt: bytes per number in the model dtype)."""
        return 0

    def grow(self, capacity: int) -> None:
        pass

    def prefill(self, q, k, kv, keep) -> torch.Tensor:
        """Fit the policy's state on the prompt; scores of the last prompt query over the prompt."""
        raise NotImplementedError

    def step(self, q, k_t, kv, t: int) -> torch.Tensor:
        """Take token t (q, k_t (B, Hk, 1, D), its raw kv); scores over tokens 0..t for the step's query."""
        raise NotImplementedError

    def restrict(self, candidate: torch.Tensor) -> torch.Tensor:
        """The candidate mask (S, L) narrowed to what the policy still may select (H2O: not evicted)."""
        return candidate

    def chosen(self, top: torch.Tensor, top_ok: torch.Tensor, candidate: torch.Tensor) -> None:
        """This step's selection (S, k) out of `candidate` (S, L)."""

    def observe(self, weights: torch.Tensor) -> None:
        """weights (S, C): this step's attention on each pool slot, summed over the stream's heads."""

    def tensors(self) -> list[torch.Tensor]:
        """The state this policy holds on the GPU (for allocated_bytes)."""
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

