"""What the sparse engine holds, computed without allocating (docs/lrqk.md §3): the host row store, the bounded
GPU pool and maps, and each selection policy's own GPU state (its `state_bytes`); the per-layer stream geometry
the plan and the allocation share; and the check that a plan fits free memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lrkv.config import ModelConfig
from lrkv.inference.sparse.config import SparseConfig
from lrkv.inference.sparse.registry import policy_class
from lrkv.model import cache_layout


@dataclass
class MemoryPlan:
    cpu_bytes: int  # host memory: row stores (+ staging), pinned where possible
    gpu_bytes: int  # pool slots, slot maps, proxy factors, validity mask
    detail: dict

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.detail.items())
        return (f"sparse memory plan: CPU {self.cpu_bytes / 2**30:.3f} GiB, GPU {self.gpu_bytes / 2**30:.3f} GiB "
                f"({parts})")


class MemoryPlanError(MemoryError):
    """The decoder's memory plan does not fit the free host or device memory."""


def free_host_bytes() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


SPARSE_ATTENTION = ("lrkv", "mha", "gqa", "mqa")  # variants whose keys_values the engine reads (not mla)


@dataclass(frozen=True)
class Geometry:
    """Stream counts and row widths of one layer's sparse state, shared by the plan and the allocation (so the two
    cannot drift), from the attention's own cache layout. A selection stream ("pool stream") picks its tokens
    independently: per query head (mha/gqa/mqa, as LRQK's reference), per KV head (proxy "group"), or per batch row
    (lrkv: every head's key is rebuilt from one row)."""

    batch: int
    store: int  # row-store streams (batch x the layout's row streams)
    row: int  # numbers per stored row
    key_width: int  # numbers of a row the exact keys are rebuilt from
    pool: int  # selection streams, each with its own GPU slot set
    key_heads: int  # heads per selection stream with their own keys (lrkv: H; else 1)
    proxies: int  # LRQK A_K factors
    heads: int  # query heads sharing one A_K

    @property
    def per_row(self) -> int:
        """Selection streams per batch row."""
        return self.pool // self.batch

    def streams(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, ...) per query head -> (selection streams, heads per stream, ...)."""
        return x.reshape(self.pool, -1, *x.shape[2:])

    def key_streams(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hk, ...) per key head -> (selection streams, key heads per stream, ...), repeating a KV head's tensor
        for each query head of its group when selection is per query head."""
        per_row = self.pool * self.key_heads // self.batch
        if x.shape[1] != per_row:
            x = x.repeat_interleave(per_row // x.shape[1], dim=1)
        return x.reshape(self.pool, self.key_heads, *x.shape[2:])

    def proxy_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, ...) per query head -> (proxies, heads per proxy, ...)."""
        return x.reshape(self.proxies, self.heads, *x.shape[2:])


def geometry(m: ModelConfig, cfg: SparseConfig, batch: int) -> Geometry:
    if m.attn not in SPARSE_ATTENTION:
        raise ValueError(f"the sparse decoder does not support attention '{m.attn}' "
                         f"(supported: {', '.join(SPARSE_ATTENTION)})")
    layout = cache_layout(m)
    store = batch * layout.streams
    rows = dict(batch=batch, store=store, row=layout.row, key_width=layout.key_width)
    if layout.key_heads > 1:  # every head's key rebuilt from one row (lrkv): one selection per row (docs/lrqk.md §7)
        shared = cfg.proxy == "shared"
        return Geometry(**rows, pool=store, key_heads=layout.key_heads,
                        proxies=store if shared else store * layout.key_heads, heads=layout.key_heads if shared else 1)
    if cfg.proxy == "group":  # one A_K, selection and slot set per KV head, scored by the group's query heads
        return Geometry(**rows, pool=store, key_heads=1, proxies=store, heads=layout.group)
    n = batch * m.n_head  # per query head
    return Geometry(**rows, pool=n, key_heads=1, proxies=n, heads=1)


def memory_plan(m: ModelConfig, cfg: SparseConfig, batch: int, max_context: int,
                dtype: torch.dtype = torch.float32, offload: bool = True) -> MemoryPlan:
    """Bytes the decoder allocates for `batch` rows of up to `max_context` tokens, computed without allocating.
    Excludes weights and the transient prefill activations (exact attention over the prompt)."""
    cfg = cfg.for_context(max_context).resolved()
    g, L, D = geometry(m, cfg, batch), max_context, m.dh
    elt = torch.empty((), dtype=dtype).element_size()
    slots = [cfg.layer_budget(i, L)[1] for i in range(m.n_layer)]  # a dense layer holds every row
    sparse = m.n_layer - min(cfg.dense_layers, m.n_layer)
    detail = {
        "store": m.n_layer * g.store * L * g.row * elt,
        "staging": g.pool * cfg.slots * g.row * elt if offload else 0,
        "pool": sum(g.pool * C * g.row * elt for C in slots),
        "slot_maps": sum(g.pool * (2 * C * 8 + L * 4) for C in slots),  # token, last use (int64); id -> slot (int32)
        "policy": sparse * policy_class(cfg.policy).state_bytes(cfg.knobs, g, L, D, elt),
        "valid": batch * L,
    }
    on_cpu = detail["store"] + detail["staging"] if offload else 0
    return MemoryPlan(on_cpu, sum(detail.values()) - on_cpu, detail)


def check_fits(plan: MemoryPlan, gpu_device: torch.device) -> None:
    """Refuse a plan larger than free memory, naming both numbers (GPU pools on a CPU device count as host)."""
    host_need = plan.cpu_bytes + (plan.gpu_bytes if gpu_device.type == "cpu" else 0)
    host_free = free_host_bytes()
    if host_need > host_free:
        raise MemoryPlanError(f"sparse decoder plan needs {host_need} bytes of host memory, only {host_free} are free "
                              f"({plan})")
    if gpu_device.type == "cuda":
        dev_free, _ = torch.cuda.mem_get_info(gpu_device)
        if plan.gpu_bytes > dev_free:
            raise MemoryPlanError(f"sparse decoder plan needs {plan.gpu_bytes} bytes on {gpu_device}, "
                                  f"only {dev_free} are free "
                                  f"({plan})")
