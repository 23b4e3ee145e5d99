"""Storage the sparse engine owns (docs/lrqk.md §3, §7): a per-layer CPU row store holding every token's
full-precision payload, a bounded GPU slot pool holding the rows in use, and the H2D path between them.

A "row" is what one token contributes to one store stream: for LRKV the pre-RoPE payload
[k_s | v_s | z_k (H r_k) | z_v (H r_v)] shared by all heads; for MHA/GQA/MQA the rotated [k | v] of one KV head.
Pool streams are the units that select tokens independently (LRKV: one per batch row; GQA: one per query head,
as the reference), each reading rows from one store stream. Each attention module describes its row
(lrkv/model.py: cache_layout, cache_rows).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.profiler import record_function

def host_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    """Host buffer, page-locked when asked (only meaningful with CUDA); falls back to pageable with one warning."""
    if pin and device.type == "cpu":
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError as e:
            warnings.warn(f"sparse decoder: pinning {shape} {dtype} failed ({str(e).splitlines()[0]}); "
                          "using pageable memory")
    return torch.empty(shape, dtype=dtype, device=device)


class RowStore:
    """All tokens' rows of one layer: (streams, capacity, row) on the store device (CPU, pinned where possible).

    Appends from the GPU are asynchronous into pinned memory; `ready()` waits for them before the host reads.
    """

    def __init__(self, streams: int, capacity: int, row: int, dtype: torch.dtype, device: torch.device, pin: bool):
        self.pin, self.device = pin, device
        self.rows = host_empty((streams, capacity, row), dtype, device, pin)
        self._pending: torch.cuda.Event | None = None

    @property
    def capacity(self) -> int:
        return self.rows.shape[1]

    def grow(self, capacity: int) -> None:
        old = self.rows
        self.ready()
        self.rows = host_empty((old.shape[0], capacity, old.shape[2]), old.dtype, self.device, self.pin)
        self.rows[:, : old.shape[1]] = old

    def write(self, start: int, rows: torch.Tensor) -> None:
        """rows (streams, T, row) from any device, stored at token ids start..start+T-1."""
        self.rows[:, start : start + rows.shape[1]].copy_(rows, non_blocking=rows.is_cuda)
        if rows.is_cuda and not self.rows.is_cuda:
            self._pending = torch.cuda.Event()
            self._pending.record()

    def ready(self) -> None:
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None


class HostToDevice:
    """Gathers store rows into one staging buffer (pinned) and moves them to the pool device with one copy,
    on a side CUDA stream where CUDA exists; the compute stream waits for it before the rows are used."""

    def __init__(self, rows: int, row: int, dtype: torch.dtype, store_device: torch.device,
                 pool_device: torch.device, pin: bool, offload: bool):
        self.pool_device = pool_device
        self.direct = not offload  # the store already sits on the pool device: gather in place
        self.staging = None if self.direct else host_empty((rows, row), dtype, store_device, pin)
        self.stream = torch.cuda.Stream(pool_device) if pool_device.type == "cuda" and not self.direct else None
        self._done: torch.cuda.Event | None = None

    def gather(self, store: RowStore, stream_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows store[stream_ids[i], token_ids[i]] as an (n, row) tensor on the pool device."""
        flat = store.rows.view(-1, store.rows.shape[2])
        index = (stream_ids * store.capacity + token_ids).to(flat.device)
        if self.direct:
            return flat.index_select(0, index)
        store.ready()
        if self._done is not None:  # the previous copy out of the staging buffer must finish before we overwrite it
            self._done.synchronize()
        buf = self.staging[: index.numel()]
        torch.index_select(flat, 0, index, out=buf)
        if self.stream is None:
            return buf.to(self.pool_device, copy=True)
        compute = torch.cuda.current_stream(self.pool_device)
        with torch.cuda.stream(self.stream):
            out = buf.to(self.pool_device, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(self.stream)
        compute.wait_stream(self.stream)
        out.record_stream(compute)
        return out


def grown(t: torch.Tensor, size: int, fill, dim: int = 1) -> torch.Tensor:
    """t with dimension `dim` enlarged to `size`, the new entries `fill` (per-token state when the store grows)."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_full(shape, fill)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


_NO_PHASE = contextlib.nullcontext()


def phase(name: str):
    """A named profiler range (benchmarks/decode.py --split times the decode step's phases) while a torch profiler
    runs, a no-op otherwise: record_function alone costs ~15 us per call on CPU, ~3 ms per 30-layer step."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else _NO_PHASE


class SlotPool:
    """Bounded per-layer pool on the GPU: `slots` (S, C, row), the token id in each slot (-1 = empty), a token
    id -> slot map, and a last-use step per slot (least recently used slots are overwritten first)."""

    def __init__(self, streams: int, slots: int, row: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.slots = torch.zeros(streams, slots, row, dtype=dtype, device=device)
        self.token = torch.full((streams, slots), -1, dtype=torch.long, device=device)
        self.slot_of = torch.full((streams, capacity), -1, dtype=torch.int32, device=device)  # int32: O(l) per stream
        self.last_used = torch.full((streams, slots), -1, dtype=torch.long, device=device)
        self.clock = 0

    def grow(self, capacity: int, slots: int | None = None) -> None:
        """Room for token ids below `capacity`, and `slots` slots per stream when given (a dense layer holds every
        row)."""
        self.slot_of = grown(self.slot_of, capacity, -1)
        if slots is not None:
            self.slots, self.token = grown(self.slots, slots, 0), grown(self.token, slots, -1)
            self.last_used = grown(self.last_used, slots, -1)

    def update(self, wanted: torch.Tensor, wanted_ok: torch.Tensor, kept: int, fresh: torch.Tensor,
               fresh_ok: torch.Tensor, fresh_rows: torch.Tensor, store: RowStore, store_stream: torch.Tensor,
               h2d: HostToDevice) -> tuple[torch.Tensor, dict]:
        """Make the pool hold every wanted token (S, K) and every fresh token (S, F), both with validity masks.

        The first `kept` wanted columns (sinks, recent window) are wanted every step since they were new, so they
        must be resident; the rest are this step's selections: resident ones are hits, the others misses, gathered
        from the store in one transfer. Fresh rows (S, F, row) come from the device (new tokens), not counted.
        Returns the (S, C) mask of slots holding wanted or fresh tokens, and this update's counters.
        """
        S, C = self.token.shape
        K = wanted.shape[1]
        ids = torch.cat((wanted, fresh), dim=1)
        ok = torch.cat((wanted_ok, fresh_ok), dim=1)
        safe = ids.clamp(min=0)
        resident = torch.where(ok, self.slot_of.gather(1, safe).long(), -1)
        hit = resident >= 0
        need = ok & ~hit
        keep = torch.zeros(S, C + 1, dtype=torch.bool, device=ids.device)
        keep.scatter_(1, torch.where(hit, resident, C), True)
        keep = keep[:, :C]
        # invariants as one device flag, read with the index transfer below (one host sync per layer-step)
        broken = torch.stack((need[:, :kept].any(), ((~keep).sum(1) < need.sum(1)).any()))
        # free slots in overwrite order: empty first (last_used -1), then least recently used
        order = torch.where(keep, torch.iinfo(torch.long).max, self.last_used).argsort(dim=1, stable=True)
        target = order.gather(1, (need.cumsum(1) - 1).clamp(min=0))
        s_idx, j_idx = need.nonzero(as_tuple=True)
        lost, overflow = broken.tolist()
        if lost:
            raise RuntimeError("sparse pool lost a sink or recent-window token")
        if overflow:
            raise RuntimeError(f"sparse pool overflow: {int(ok.sum(1).max())} tokens wanted, {C} slots")
        new_ids, new_slots = ids[s_idx, j_idx], target[s_idx, j_idx]
        old = self.token[s_idx, new_slots]
        evicted = old >= 0
        self.slot_of[s_idx[evicted], old[evicted]] = -1
        self.slot_of[s_idx, new_ids] = new_slots.int()
        self.token[s_idx, new_slots] = new_ids
        missed = j_idx < K
        with phase("sparse.gather"):  # the only CPU -> GPU traffic: the missing rows, one transfer
            self.slots[s_idx[missed], new_slots[missed]] = h2d.gather(store, store_stream[s_idx[missed]],
                                                                      new_ids[missed])
        from_device = ~missed
        self.slots[s_idx[from_device], new_slots[from_device]] = fresh_rows[s_idx[from_device], j_idx[from_device] - K]
        self.clock += 1
        active = keep  # the hits' slots, plus where the needed tokens landed (ids are distinct within a stream)
        active[s_idx, new_slots] = True
        self.last_used = torch.where(active, self.clock, self.last_used)
        n_miss = missed.sum()  # counters stay on the device; the decoder reads them once per step
        counts = {"hits": hit[:, kept:K].sum(), "misses": n_miss, "selections": wanted_ok[:, kept:].sum(),
                  "bytes_moved": n_miss * (self.slots.shape[2] * self.slots.element_size())}
        return active, counts
