"""What the hybrid cache holds, computed without allocating (docs/lrqk.md §3): the host row store, the bounded
GPU pool and maps, and each selection policy's own GPU state; plus the check that a plan fits free memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lrkv.config import ModelConfig
from lrkv.inference.lrqk.config import LRQKConfig
from lrkv.model import cache_layout


@dataclass
class MemoryPlan:
    cpu_bytes: int  # host memory: row stores (+ staging), pinned where possible
    gpu_bytes: int  # pool slots, slot maps, proxy factors, validity mask
    detail: dict

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.detail.items())
        return f"LRQK memory plan: CPU {self.cpu_bytes / 2**30:.3f} GiB, GPU {self.gpu_bytes / 2**30:.3f} GiB ({parts})"


class MemoryPlanError(MemoryError):
    """The decoder's memory plan does not fit the free host or device memory."""


def free_host_bytes() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


QUEST_PAGE = 16  # tokens per page (Quest's default)


LRQK_ATTENTION = ("lrkv", "mha", "gqa", "mqa")  # variants whose keys_values the decoder reads (not mla)


def geometry(m: ModelConfig, cfg: LRQKConfig, batch: int) -> dict:
    """Stream counts and row widths shared by the plan and the allocation (so the two cannot drift), from the
    attention's own cache layout. pool: selection streams; store: row-store streams; key_heads: heads per pool
    stream with their own keys; key_width: numbers per stored token that the exact keys are rebuilt from;
    proxies/heads: LRQK A_K count and query heads sharing one A_K."""
    if m.attn not in LRQK_ATTENTION:
        raise ValueError(f"LRQK does not support attention '{m.attn}' (supported: {', '.join(LRQK_ATTENTION)})")
    layout = cache_layout(m)
    store = batch * layout.streams
    rows = dict(store=store, row=layout.row, key_width=layout.key_width)
    if layout.key_heads > 1:  # every head's key rebuilt from one row (lrkv): one selection per row (docs/lrqk.md §7)
        shared = cfg.proxy == "shared"
        return dict(rows, pool=store, key_heads=layout.key_heads, proxies=store if shared else store * layout.key_heads,
                    heads=layout.key_heads if shared else 1)
    if cfg.proxy == "group":  # one A_K, selection and slot set per KV head, scored by the group's query heads
        return dict(rows, pool=store, key_heads=1, proxies=store, heads=layout.group)
    return dict(rows, pool=batch * m.n_head, key_heads=1, proxies=batch * m.n_head, heads=1)  # per query head


def policy_state_bytes(cfg: LRQKConfig, g: dict, L: int, D: int, elt: int) -> int:
    """One layer's selection state on the GPU for up to L tokens (see policies.py for what each policy keeps)."""
    r, m = cfg.rank, g["key_heads"]
    if cfg.policy == "lrqk":  # A_K (model dtype) per proxy; B_K, B_Q fp32
        return g["proxies"] * (L * r * elt + 4 * (r * D + g["heads"] * r * D))
    if cfg.policy == "loki":  # rank-r projected keys (model dtype) and the D x r basis (fp32) per stream and head
        return g["pool"] * m * (L * r * elt + 4 * D * r)
    if cfg.policy == "quest":  # element-wise min and max key per page (fp32)
        return g["pool"] * m * -(-L // QUEST_PAGE) * 2 * D * 4
    if cfg.policy == "h2o":  # accumulated attention (fp32) and the evicted flag per token
        return g["pool"] * L * 5
    if cfg.policy == "exact":  # the oracle scores every stored key: all keys resident (it ignores memory)
        return g["store"] * L * g["key_width"] * elt
    return 0  # streaming: positions only


def memory_plan(m: ModelConfig, cfg: LRQKConfig, batch: int, max_context: int,
                dtype: torch.dtype = torch.float32, offload: bool = True) -> MemoryPlan:
    """Bytes the decoder allocates for `batch` rows of up to `max_context` tokens, computed without allocating.
    Excludes weights and the transient prefill activations (exact attention over the prompt)."""
    cfg = cfg.for_context(max_context)
    g, C, L, D = geometry(m, cfg, batch), cfg.slots, max_context, m.dh
    elt = torch.empty((), dtype=dtype).element_size()
    layers = m.n_layer
    detail = {
        "store": layers * g["store"] * L * g["row"] * elt,
        "staging": g["pool"] * C * g["row"] * elt if offload else 0,
        "pool": layers * g["pool"] * C * g["row"] * elt,
        "slot_maps": layers * g["pool"] * (2 * C * 8 + L * 4),  # token + last-use per slot (int64), id -> slot (int32)
        "policy": layers * policy_state_bytes(cfg, g, L, D, elt),
        "valid": batch * L,
    }
    on_cpu = detail["store"] + detail["staging"] if offload else 0
    return MemoryPlan(on_cpu, sum(detail.values()) - on_cpu, detail)


def check_fits(plan: MemoryPlan, gpu_device: torch.device) -> None:
    """Refuse a plan larger than free memory, naming both numbers (GPU pools on a CPU device count as host)."""
    host_need = plan.cpu_bytes + (plan.gpu_bytes if gpu_device.type == "cpu" else 0)
    host_free = free_host_bytes()
    if host_need > host_free:
        raise MemoryPlanError(f"LRQK plan needs {host_need} bytes of host memory, only {host_free} are free ({plan})")
    if gpu_device.type == "cuda":
        dev_free, _ = torch.cuda.mem_get_info(gpu_device)
        if plan.gpu_bytes > dev_free:
            raise MemoryPlanError(f"LRQK plan needs {plan.gpu_bytes} bytes on {gpu_device}, only {dev_free} are free "
                                  f"({plan})")
