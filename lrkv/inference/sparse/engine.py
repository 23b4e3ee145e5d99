"""The sparse decoding engine (docs/lrqk.md §1-3 for LRQK, §7 for LRKV models), hosting any selection policy.

Prefill is exact attention over the prompt; it writes every token's full-precision row to the per-layer CPU row
store (store.py), lets the policy fit its state on the prompt (LRQK: the low-rank factors) and seeds the bounded GPU
pool. Each decode step lets the policy score the older tokens, keeps `sinks` first tokens + the `recent` window +
the policy's top-k, fetches only the rows missing from the pool, and attends exactly over them.

Selection streams (one stream = one independent token selection, plan.Geometry):
- mha/gqa/mqa (e.g. converted Llama/Qwen2): per query head as LRQK's reference, or per KV head (proxy "group"); the
  CPU store holds one row per KV head (rotated k | v).
- lrkv: one selection per layer and batch row, score_j = max_h (s_h(j) - max s_h); the store row is the pre-RoPE
  payload [k_s | v_s | z_k | z_v] shared by all heads, keys rebuilt and rotated at attention time.
The model's own modules run everything else: each SparseLayer is the model's LayerCache (lrkv/model.py) for its
layer, and reads the module only through its public description (cache_layout, cache_rows, keys_values). A policy
sees the layer only through a LayerView (policy.py). Ownership is a tree (decoder -> state -> layers -> policy ->
view), so a decoder is freed as soon as it is dropped. `SparseDecoder.probe` hands evaluations what every layer
attended at each decode step (DecodeStep).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from lrkv.config import ModelConfig
from lrkv.inference.decoder import Counts, DecodeStats
from lrkv.inference.full import FullDecoder
from lrkv.inference.sparse.config import SparseConfig
from lrkv.inference.sparse.plan import MemoryPlan, check_fits, geometry, memory_plan
from lrkv.inference.sparse.policy import LayerView, qk, select_top_k
from lrkv.inference.sparse.registry import policy_class
from lrkv.inference.sparse.store import HostToDevice, RowStore, SlotPool, phase
from lrkv.kernels.reference import attention, causal_attention
from lrkv.model import DecoderCache, LayerCache, Transformer, cache_layout

COUNTERS = tuple(f.name for f in fields(Counts) if f.name != "steps")  # what layers add up on the device per step


@dataclass
class DecodeStep:
    """What one layer attended at one sparse decode step, handed to `SparseDecoder.probe` (for evaluations).

    Selection streams are the decoder's independent selections (lrkv: one per batch row; mha/gqa/mqa: one per query
    head, or per KV head with proxy="group"); the per-head tensors are per query head whatever the streams."""

    layer: int
    position: int  # the decoded token's position; tokens 0..position are stored
    q: torch.Tensor  # (B, H, 1, D) the rotated query
    y: torch.Tensor  # (B, H, 1, D) the attention output over the attended tokens
    scores: torch.Tensor  # (selection streams, heads per stream, position + 1) the policy's scores top-k came from
    selected: torch.Tensor  # (selection streams, top_k) the policy's top-k token ids, -1 where fewer candidates
    selected_ok: torch.Tensor  # (selection streams, top_k) bool
    attended: torch.Tensor  # (B, H, position + 1) bool: the tokens query head h attended (sinks, recent, top-k)
    keys: torch.Tensor  # (B, H, position + 1, D) every stored token's exact (rotated) key as head h reads it
    values: torch.Tensor  # (B, H, position + 1, D)


class _Context:
    """What every layer of one decoder state shares: settings, the validity history, the transfer path, this step's
    counters (device tensors, read once per step) and the probe. Holds no layer, so nothing refers back."""

    def __init__(self, cfg: SparseConfig, batch: int, capacity: int, h2d: HostToDevice, device: torch.device,
                 keep_prompt: bool, probe):
        self.cfg, self.h2d, self.keep_prompt, self.probe = cfg, h2d, keep_prompt, probe
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.padded = False
        self.last_step: dict = dict.fromkeys(COUNTERS, 0)
        self.window: tuple = (None, None)  # (key, value) of SparseLayer.window: every layer of a step asks the same


# ------------------------------------------------------------------------------------------ per-layer cache


class SparseLayer(LayerCache):
    """One layer's sparse state; the attention module calls `attend` (prefill when T > 1, a decode step when T == 1)."""

    def __init__(self, ctx: _Context, index: int, module, batch: int, capacity: int, model_cfg: ModelConfig,
                 dtype: torch.dtype, device: torch.device, store_device: torch.device, pin: bool,
                 generator: torch.Generator):
        self.ctx, self.index, self.module = ctx, index, module
        self.length = 0
        cfg = ctx.cfg
        g = self.geo = geometry(model_cfg, cfg, batch)
        self.batch, self.device = batch, device
        self.store = RowStore(g.store, capacity, g.row, dtype, store_device, pin)
        self.dense = index < cfg.dense_layers
        self.top_k, slots = cfg.layer_budget(index, capacity)
        self.pool = SlotPool(g.pool, slots, g.row, capacity, dtype, device)
        pool_ids = torch.arange(g.pool, device=device)
        self.batch_of = pool_ids // g.per_row
        if g.pool == g.store:  # one selection per row stream: lrkv, or group-shared gqa (per KV head)
            self.store_of = pool_ids
        else:  # per query head: pool stream (b, h) reads the row stream (KV head) that query head h reads
            layout = module.cache_layout
            self.store_of = self.batch_of * layout.streams + layout.stream_of_head(pool_ids % layout.n_head)
        self.view = LayerView(g, index, self.top_k, cfg.recent, cfg.sinks, device, dtype, module.head_dim, module,
                              self.store, self.pool, generator)
        policy = policy_class("full" if self.dense else cfg.policy)
        self.policy = policy(self.view, policy.Knobs() if self.dense else cfg.knobs, capacity)
        self.recall: list[float] = []
        self.prompt: tuple | None = None  # (q, kv) of the prompt, kept when the decoder is asked to (fork)

    def grow(self, capacity: int) -> None:
        self.store.grow(capacity)
        if self.dense:
            self.top_k, slots = self.ctx.cfg.layer_budget(self.index, capacity)
            self.pool.grow(capacity, slots)
        else:
            self.pool.grow(capacity)
        self.policy.grow(capacity)

    # -- attention ----------------------------------------------------------------------------------------------

    def attend(self, module, q: torch.Tensor, kv: tuple[torch.Tensor, ...], key_valid: torch.Tensor | None):
        if module is not self.module:
            raise RuntimeError(f"sparse layer {self.index} was called by a different attention module")
        B, H, T, D = q.shape
        y = self.prefill(q, kv, key_valid) if T > 1 or self.length == 0 else self.decode(q, kv)
        return y.transpose(1, 2).reshape(B, T, H * D)

    def prefill(self, q, kv, key_valid):
        if self.length != 0:
            raise RuntimeError("sparse prefill runs once, on an empty cache; decode one token per step afterwards")
        rows = self.module.cache_rows(kv)
        self.store.write(0, rows)
        k, v = self.view.leading_keys_values(rows, values=True)  # what the policy scores: views of the rows for GQA
        y = causal_attention(q, k, v, key_valid=key_valid)
        if self.ctx.keep_prompt:
            self.prompt = (q, kv)
        self.seed(q, k, kv, rows)
        return y

    def seed(self, q, k, kv, rows):
        """Fit the policy on the prompt (rows already in the store) and fill the pool with the prompt rows already on
        the device: sinks, recent window, the policy's top-k for the last prompt query."""
        T = q.shape[2]
        keep = self.ctx.valid[:, :T].float() if self.ctx.padded else None
        scores = self.policy.prefill(q, k, kv, keep)
        self.length = T
        sinks, sinks_ok, recent, recent_ok, cand = self.window(T, include_current=True)
        cand = self.policy.restrict(cand)
        top, top_ok = select_top_k(scores, cand, self.top_k)
        self.policy.chosen(top, top_ok, cand)
        fresh = torch.cat((sinks, recent, top), dim=1)
        fresh_ok = torch.cat((sinks_ok, recent_ok, top_ok), dim=1)
        fresh_rows = rows[self.store_of[:, None], fresh.clamp(min=0)]  # only the seeded rows, not pool x T
        none = fresh[:, :0]
        self.active, _ = self.pool.update(none, none.bool(), 0, fresh, fresh_ok, fresh_rows, self.store,
                                          self.store_of, self.ctx.h2d)

    def window(self, length: int, include_current: bool):
        """Per selection stream: sink ids, recent-window ids (the last `recent` tokens; without the current one when
        it is passed in fresh), and the candidate mask over [0, length) for top-k: valid, not sink, not recent.
        Computed by the first layer of a step, read by the others (the layers' selection streams are alike)."""
        key, value = self.ctx.window
        if key == (length, include_current):
            return value
        cfg, dev = self.ctx.cfg, self.device
        valid = self.ctx.valid[self.batch_of, :length]
        start = max(length - cfg.recent, 0)
        recent = torch.arange(start, length if include_current else length - 1, device=dev).expand(len(valid), -1)
        recent_ok = valid.gather(1, recent)
        first = valid.int().argmax(1, keepdim=True)  # left padding: the first real token
        sinks = first + torch.arange(cfg.sinks, device=dev)
        sinks_ok = sinks < start
        sinks = torch.where(sinks_ok, sinks, -1)
        ids = torch.arange(length, device=dev)
        cand = valid & (ids >= first + cfg.sinks) & (ids < start)
        value = sinks, sinks_ok, torch.where(recent_ok, recent, -1), recent_ok, cand
        self.ctx.window = (length, include_current), value
        return value

    def decode(self, q, kv):
        # named phases for benchmarks/decode.py --split (no-ops unless a profiler runs)
        ctx, cfg, g = self.ctx, self.ctx.cfg, self.geo
        B, H, _, D = q.shape
        t = self.length
        L = t + 1
        with phase("sparse.store"):
            rows = self.module.cache_rows(kv)  # (store streams, 1, row)
            self.store.write(t, rows)
            pos_t = torch.full((g.pool, 1), t, device=q.device)
            fresh_rows = rows[self.store_of]
            k_t, _ = self.view.keys_values(fresh_rows, pos_t, values=False)
        with phase("sparse.score"):
            scores = self.policy.step(q, k_t, kv, t)
        self.length = L
        with phase("sparse.topk"):  # sinks + recent window (kept resident) + top-k of the older tokens
            sinks, sinks_ok, recent, recent_ok, cand = self.window(L, include_current=False)
            cand = self.policy.restrict(cand)
            top, top_ok = select_top_k(scores, cand, self.top_k)
            self.policy.chosen(top, top_ok, cand)
        if cfg.measure_recall:
            exact = select_top_k(self.view.exact_scores(q, L), cand, self.top_k)
            self.recall.append(_recall(top, top_ok, *exact))
        self.selected, self.selected_ok = top, top_ok
        with phase("sparse.pool"):
            wanted = torch.cat((sinks, recent, top), dim=1)
            wanted_ok = torch.cat((sinks_ok, recent_ok, top_ok), dim=1)
            self.active, counts = self.pool.update(wanted, wanted_ok, sinks.shape[1] + recent.shape[1], pos_t,
                                                   torch.ones_like(pos_t, dtype=torch.bool), fresh_rows, self.store,
                                                   self.store_of, ctx.h2d)
            for key, n in counts.items():
                ctx.last_step[key] += n
        with phase("sparse.attention"):  # exact attention over the active slots
            k, v = self.view.keys_values(self.pool.slots, self.pool.token.clamp(min=0))
            mask = self.active.view(B, g.per_row, 1, -1).repeat_interleave(H // g.per_row, dim=1)
            if not self.policy.wants_weights:
                y = attention(q, k, v, mask)
            else:
                weights = (qk(q, k) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
                self.policy.observe(g.streams(weights[:, :, 0]).sum(1))
                y = (weights.to(v.dtype).unflatten(1, (k.shape[1], -1)) @ v[:, :, None]).flatten(1, 2)
        if ctx.probe is not None:
            ctx.probe(self.probe_step(t, q, y, scores))
        return y

    def probe_step(self, t: int, q: torch.Tensor, y: torch.Tensor, scores: torch.Tensor) -> DecodeStep:
        """This step as the probe sees it: the attended set per query head, every stored key and value."""
        B, H, L = q.shape[0], q.shape[1], t + 1
        pool = self.pool
        counts = torch.zeros(pool.token.shape[0], L, device=q.device)  # empty slots (token -1, inactive) add 0
        counts.scatter_add_(1, pool.token.clamp(min=0), self.active.float())
        per_row = self.geo.per_row
        attended = (counts > 0).view(B, per_row, L).repeat_interleave(H // per_row, dim=1)
        k, v = self.view.stored_keys_values(L, values=True)
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
        return DecodeStep(self.index, t, q, y, scores, self.selected, self.selected_ok, attended, k, v)


def _recall(top, ok, exact_top, exact_ok) -> float:
    """Mean over streams of |proxy top-k ∩ exact top-k| / |exact top-k| (streams with no candidates skipped)."""
    match = ((top[:, :, None] == exact_top[:, None, :]) & ok[:, :, None] & exact_ok[:, None, :]).sum((1, 2))
    n = exact_ok.sum(1)
    has = n > 0
    return float((match[has] / n[has]).mean()) if bool(has.any()) else 1.0


class _SparseState(DecoderCache):
    """The model's cache (DecoderCache) during sparse decoding: the per-layer caches and their shared context."""

    def __init__(self, decoder: "SparseDecoder", batch: int, capacity: int, keep_prompt: bool):
        cfg, m = decoder.cfg, decoder.model.cfg
        g = geometry(m, cfg, batch)
        h2d = HostToDevice(g.pool * cfg.slots, g.row, decoder.dtype, decoder.store_device, decoder.gpu_device,
                           decoder.pin, decoder.offload)
        self.ctx = _Context(cfg, batch, capacity, h2d, decoder.gpu_device, keep_prompt, decoder.probe)
        generator = torch.Generator(decoder.gpu_device).manual_seed(cfg.seed)
        self.layers = [SparseLayer(self.ctx, i, block.attn, batch, capacity, m, decoder.dtype, decoder.gpu_device,
                                   decoder.store_device, decoder.pin, generator)
                       for i, block in enumerate(decoder.model.layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.ctx.valid.shape[1]

    def ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for layer in self.layers:
            layer.grow(capacity)
        valid = self.ctx.valid
        grown = valid.new_zeros(valid.shape[0], capacity)
        grown[:, : valid.shape[1]] = valid
        self.ctx.valid = grown

    def key_valid(self, valid: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor | None:
        ctx, start = self.ctx, self.length
        ctx.padded = ctx.padded or valid is not None
        ctx.valid[:, start : start + steps] = True if valid is None else valid
        return ctx.valid[:, : start + steps] if ctx.padded else None


class SparseDecoder:
    """Sparse generation state over a Transformer (lrkv, mha, gqa, mqa) with any registered selection policy
    (SparseConfig.policy). `prefill` once, then `step` per token; `fork` + `Lockstep` decode several policies from
    one prefill.

    offload=True keeps the row store on `cpu_device` (pinned when the GPU is CUDA); offload=False keeps it on
    `gpu_device`: the same algorithm without transfers, for comparison. `max_context` sizes the store up front
    (the memory plan's number); without it the store starts at twice the prompt and doubles when full.

    `probe`, when set to a callable, is called at every sparse decode step of every layer (the `sparse_query_tail`
    prompt tokens included) with a DecodeStep: what the layer selected and attended, with every stored key and
    value for an exact reference. It costs nothing while None; forks start without one.
    """

    def __init__(self, model: Transformer, cfg: SparseConfig, gpu_device="cpu", cpu_device="cpu",
                 pin_memory=True, offload: bool = True, max_context: int | None = None):
        m = model.cfg
        cfg = cfg.resolved()
        geometry(m, cfg, 1)  # refuses unsupported attention types
        cfg.validate(m.dh)
        expected = cache_layout(m)  # the plan is computed from the config: every module must lay its cache out so
        for i, block in enumerate(model.layers):
            attn = block.attn
            if attn.cache_layout != expected:
                raise ValueError(f"layer {i}: attention module {type(attn).__name__} does not match the model "
                                 f"config (attn={m.attn}, n_head={m.n_head}, head_dim={m.dh})")
        self.model, self.requested, self.cfg = model, cfg, cfg  # cfg: the requested one resolved per prefill
        self.gpu_device, self.cpu_device = torch.device(gpu_device), torch.device(cpu_device)
        param = next(model.parameters())
        if param.device != self.gpu_device:
            raise ValueError(f"model is on {param.device}, expected gpu_device {self.gpu_device}")
        self.dtype = param.dtype
        self.offload, self.max_context = offload, max_context
        self.store_device = self.cpu_device if offload else self.gpu_device
        self.pin = pin_memory and offload and self.gpu_device.type == "cuda"
        self._probe: Callable[[DecodeStep], None] | None = None
        self.state: _SparseState | None = None
        self.stats = DecodeStats()

    @property
    def probe(self) -> Callable[[DecodeStep], None] | None:
        return self._probe

    @probe.setter
    def probe(self, probe: Callable[[DecodeStep], None] | None) -> None:
        self._probe = probe
        if self.state is not None:
            self.state.ctx.probe = probe

    @staticmethod
    def memory_plan(model_cfg: ModelConfig, cfg: SparseConfig, batch: int, max_context: int,
                    dtype: torch.dtype = torch.float32, offload: bool = True) -> MemoryPlan:
        return memory_plan(model_cfg, cfg, batch, max_context, dtype, offload)

    @property
    def length(self) -> int:
        return self.state.length

    def _new_state(self, batch: int, capacity: int, keep_prompt: bool) -> _SparseState:
        check_fits(self.memory_plan(self.model.cfg, self.cfg, batch, capacity, self.dtype, self.offload),
                   self.gpu_device)
        return _SparseState(self, batch, capacity, keep_prompt)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None, logits_to_keep: int = 0,
                keep_prompt: bool = False) -> torch.Tensor:
        """Exact attention over the prompt (B, T) -> logits (B, T, V) (the last `logits_to_keep` positions if > 0);
        the last `sparse_query_tail` tokens go through the sparse decode path instead (their logits are decode logits).
        keep_prompt=True keeps every layer's prompt queries and keys so that `fork` and `full_decoder` can start
        other decoders from this prefill."""
        B, T = idx.shape
        if keep_prompt and self.cfg.sparse_query_tail:
            raise ValueError("keep_prompt needs sparse_query_tail = 0: a fork starts right after the exact prefill")
        tail = self.cfg.sparse_query_tail
        if tail >= T:
            raise ValueError(f"sparse_query_tail {tail} must be smaller than the prompt length {T}")
        if tail and valid is not None and not bool(valid[:, T - tail :].all()):
            raise ValueError("sparse_query_tail covers padding: every row must have >= sparse_query_tail real tokens")
        self.cfg = self.requested.for_context(T)
        capacity = self.max_context if self.max_context is not None else 2 * T
        if capacity < T:
            raise ValueError(f"prompt length {T} exceeds max_context {capacity}")
        self.state = self._new_state(B, capacity, keep_prompt)
        self.stats = DecodeStats()
        head = T - tail
        keep_head = 0 if logits_to_keep == 0 else max(logits_to_keep - tail, 1)
        logits = [self.model(idx[:, :head], cache=self.state, valid=None if valid is None else valid[:, :head],
                             logits_to_keep=keep_head)]
        logits += [self.step(idx[:, i : i + 1]) for i in range(head, T)]
        logits = torch.cat(logits, dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits

    def _prompt(self) -> list[tuple]:
        s = self.state
        if s is None or s.layers[0].prompt is None:
            raise RuntimeError("fork/full_decoder need a prefill(..., keep_prompt=True) first")
        if s.length != s.layers[0].prompt[0].shape[2]:
            raise RuntimeError("fork/full_decoder start after the prompt: call them before the first step")
        return [layer.prompt for layer in s.layers]

    @torch.no_grad()
    def fork(self, cfg: SparseConfig | None = None) -> "SparseDecoder":
        """A decoder with another config (policy, budget, knobs; default this one) positioned after the same prompt,
        without running the model again: prefill attention is exact whatever the config, so only the row store is
        copied and the policy fitted and the pool seeded anew. Every fork decodes independently."""
        prompts, s = self._prompt(), self.state
        cfg = self.requested if cfg is None else cfg
        other = SparseDecoder(self.model, cfg.for_context(s.length), self.gpu_device, self.cpu_device, self.pin,
                              self.offload, self.max_context)
        B, capacity = s.ctx.valid.shape
        other.state = other._new_state(B, capacity, keep_prompt=False)
        other.state.ctx.valid.copy_(s.ctx.valid)
        other.state.ctx.padded = s.ctx.padded
        for mine, theirs, (q, kv) in zip(s.layers, other.state.layers, prompts):
            T = q.shape[2]
            mine.store.ready()
            theirs.store.rows[:, :T].copy_(mine.store.rows[:, :T])
            rows = theirs.module.cache_rows(kv)
            theirs.seed(q, theirs.view.leading_keys_values(rows)[0], kv, rows)
        return other

    def full_decoder(self) -> FullDecoder:
        """The model's own exact cache over the kept prompt, as FullDecoder.prefill would have built it."""
        prompts, s = self._prompt(), self.state
        dec = FullDecoder(self.model)
        dec.cache = self.model.new_cache()
        for layer, cache, (q, kv) in zip(s.layers, dec.cache.layers, prompts):
            cache.append(**layer.module.cache_entries(kv))
        B, T = s.ctx.valid.shape[0], s.length
        dec.cache.key_valid(s.ctx.valid[:, :T] if s.ctx.padded else None, B, T, self.gpu_device)
        return dec

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One sparse decode step: tokens (B, 1) -> logits (B, 1, V)."""
        self._begin_step(tokens)
        logits = self.model(tokens, cache=self.state)
        self._end_step()
        return logits

    def _begin_step(self, tokens: torch.Tensor) -> None:
        if self.state is None:
            raise RuntimeError("SparseDecoder.step called before prefill")
        batch = self.state.ctx.valid.shape[0]
        if tokens.shape != (batch, 1):
            raise ValueError(f"step expects tokens of shape ({batch}, 1), got {tuple(tokens.shape)}")
        self.state.ensure(self.length + 1)
        self.state.ctx.last_step = dict.fromkeys(COUNTERS, 0)

    def _end_step(self) -> None:
        counters = self.state.ctx.last_step  # summed over layers on the device: read once per step
        values = torch.stack([torch.as_tensor(counters[k]) for k in COUNTERS]).tolist()
        last = Counts(**dict(zip(COUNTERS, values)), steps=1)
        self.stats.add(last)
        self.stats.last_step = last
        if self.cfg.measure_recall:
            self.stats.recall = [sum(layer.recall) / len(layer.recall) for layer in self.state.layers]

    def allocated_bytes(self) -> tuple[int, int]:
        """(host, GPU) bytes actually held by the decoder state, counted from its tensors."""
        s = self.state
        h2d = s.ctx.h2d
        stores = [layer.store.rows for layer in s.layers] + ([h2d.staging] if h2d.staging is not None else [])
        rest = [s.ctx.valid] + [t for layer in s.layers for t in (layer.pool.slots, layer.pool.token,
                                                                  layer.pool.slot_of, layer.pool.last_used,
                                                                  *layer.policy.tensors())]
        host, device = (stores, rest) if self.offload else ([], stores + rest)
        return tuple(sum(t.numel() * t.element_size() for t in ts) for ts in (host, device))


class Lockstep(DecoderCache):
    """Batch-1 decoders at the same length (e.g. forks of one prefill) stepped as one batch: one model forward per
    step for all of them, so the weights are read once, while row i attends through decoder i's own layers. Each
    decoder's outputs and counters are what its own `step` would give (up to batched-matmul rounding)."""

    def __init__(self, decoders: list[SparseDecoder]):
        if not decoders or any(d.state is None or d.state.ctx.valid.shape[0] != 1 for d in decoders):
            raise ValueError("Lockstep needs prefilled decoders of batch 1")
        if len({d.length for d in decoders}) != 1 or len({id(d.model) for d in decoders}) != 1:
            raise ValueError("Lockstep needs decoders over one model at one length")
        self.decoders, self.model = decoders, decoders[0].model
        self.layers = [_LockstepLayer(decoders, i) for i in range(len(self.model.layers))]

    @property
    def length(self) -> int:
        return self.decoders[0].length

    def key_valid(self, valid, batch: int, steps: int, device):
        for d in self.decoders:
            d.state.key_valid(None, 1, steps, device)
        return None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (len(decoders), 1) -> logits (len(decoders), 1, V)."""
        for i, d in enumerate(self.decoders):
            d._begin_step(tokens[i : i + 1])
        logits = self.model(tokens, cache=self)
        for d in self.decoders:
            d._end_step()
        return logits


class _LockstepLayer(LayerCache):
    def __init__(self, decoders: list[SparseDecoder], index: int):
        self.layers = [d.state.layers[index] for d in decoders]

    def attend(self, module, q, kv, key_valid):
        ys = [layer.attend(module, q[i : i + 1], tuple(t[i : i + 1] for t in kv), None)
              for i, layer in enumerate(self.layers)]
        return torch.cat(ys, dim=0)
