"""Decode benchmark: tokens/s, device KV memory, CPU->GPU bytes per step and hit rate, side by side per context.

    python benchmarks/decode.py                              # CPU: lrkv_debug shape, contexts 1K..8K
    python benchmarks/decode.py --device cuda --batch 8      # GPU: lrkv_125m shape, contexts 4K..128K
    python benchmarks/decode.py --device cuda --hf-export DIR --text book.txt   # converted Llama/Qwen2 export
    python benchmarks/decode.py --hf-export DIR --transformers FILE.gguf \
        --policies lrqk,exact,quest,loki,h2o,streaming --contexts 1024,4096,8192   # transformers vs lrkv, every policy
    python benchmarks/decode.py --hf-export DIR --transformers FILE.gguf --dtype bf16 --floor [--json]
                                       # each step beside the memory floor measured in the same run

Rows: MHA-full (the config's body with attn=mha), LRKV-full (the model's own cache) and LRKV-LRQK (offloaded
LRQK decoder) on random weights (LRKV B matrices drawn normal, so the residual keys are live), or, with
--hf-export, that model with its full cache (where it fits) and with each `--policies` selection policy
(`--proxy group`: one selection per KV head); `--transformers` adds the same model in transformers itself
(a Hugging Face folder or a .gguf, dequantised), decoding with its DynamicCache exactly as `generate` does per step
(one forward of the new token with past_key_values). Each case: prefill a random prompt
(or --text, tokenized and repeated) of the context length, `--warmup` untimed decode steps, then `--steps`
timed ones (median step time). "dev KV" is what the decoder keeps on the accelerator (full: the cache; LRQK:
slot pool, proxy factors, maps), "host KV" the LRQK row store; on a CPU run both live in host memory and the
columns say what a GPU would hold. Random weights give near-uniform attention, so their hit rates are not a
quality measure. "x base" is tok/s relative to the first row of the same context (MHA-full, transformers, or the
export's full). With --hf-export and policies, a "lockstep" row steps every policy and full attention as one batch
from one prefill (forks + Lockstep, as eval.ruler decodes), one weight read per step for all of them.

--floor: the machine's read bandwidth is measured with a matrix-vector product (one token through a linear layer, the
decode step's weight read) over a buffer the size of the model's weights in the model's dtype, before and after the
rows; each row then gets the bytes its step must read (the weights once per step, plus the KV rows it attends and
its policy's state, from the memory plan; the lockstep row: the weights once plus every method's rows) over that
bandwidth: `floor ms`, beside the measured step and their ratio. --json prints one object per row instead (keys
model, context, method, step_ms, floor_ms, ratio, read_bytes, prefill_s, tok_s).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lrkv.inference.sparse.config import SparseConfig, add_sparse_args, sparse_config  # noqa: E402

K = 1024
# the parser is built before torch is imported, so this mirrors lrkv.inference (tests/test_cli.py checks they agree)
DTYPE_NAMES = ("bf16", "fp32")


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python benchmarks/decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--config", help="model shape (default: lrkv_debug.yaml on cpu, lrkv_125m.yaml on cuda)")
    p.add_argument("--hf-export", help="a converted Llama/Qwen2 export folder: full vs LRQK on that model")
    p.add_argument("--text", help="with --hf-export: prompt tokens from this text file instead of random ids")
    p.add_argument("--contexts", help="comma-separated prompt lengths (default: 1K..8K cpu, 4K..128K cuda, "
                                      "32K,64K,128K with --hf-export)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--steps", type=int, help="timed decode steps (default 16 cpu, 32 cuda)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones (default 2)")
    add_sparse_args(p, {"rank": None, "top_k": None, "recent": None, "sinks": 0, "policy": "lrqk", "proxy": "shared"},
                  sweep=("policy",), preset=True, unset={"rank": "head_dim / 4: the paper's 32 at head_dim 128",
                                                         "top_k": "256 cpu, 2048 cuda"})
    p.add_argument("--transformers", help="with --hf-export: also time this HF folder or .gguf in transformers")
    p.add_argument("--split", action="store_true",
                   help="also profile --steps more LRQK steps and print where a layer-step's time goes (proxy "
                        "solve, scoring, top-k, hit/miss, gather, attention, store; CUDA time too on a GPU)")
    p.add_argument("--floor", action="store_true",
                   help="measure the read bandwidth in this run and print each step beside its memory floor")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout instead of the table")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on cpu: a small model's decode step is "
                                                 "latency-bound, and one thread keeps timings steady on a shared "
                                                 "machine; torch's default on cuda)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402

from lrkv.config import ModelConfig, load_config  # noqa: E402
from lrkv.export import open_export  # noqa: E402
from lrkv.inference.decoder import DecodeStats  # noqa: E402
from lrkv.inference.generator import DTYPES  # noqa: E402
from lrkv.inference.sparse import Lockstep, MemoryPlanError, SparseDecoder  # noqa: E402
from lrkv.model import Transformer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.text and not args.hf_export:
        p.error("--text needs --hf-export (random-weight models are fed random ids)")
    if args.transformers and not args.hf_export:
        p.error("--transformers needs --hf-export (the same model converted)")
    gpu = args.device == "cuda"
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.steps = args.steps or (32 if gpu else 16)
    default_contexts = [32, 64, 128] if args.hf_export else [4, 8, 16, 32, 64, 128] if gpu else [1, 2, 4, 8]
    args.contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else [c * K for c in default_contexts]
    return args


def random_model(cfg: ModelConfig, args: argparse.Namespace) -> Transformer:
    torch.manual_seed(0)
    with torch.device(args.device):
        return Transformer(cfg).to(args.dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TransformersDecoder:
    """A transformers causal LM behind the prefill/step API, with its own DynamicCache (generate's per-step work)."""

    def __init__(self, model):
        self.model, self.past, self.stats = model, None, DecodeStats()

    @torch.no_grad()
    def prefill(self, idx, logits_to_keep=1):
        from transformers import DynamicCache

        self.past = DynamicCache()
        return self.model(idx, past_key_values=self.past, use_cache=True, logits_to_keep=logits_to_keep).logits

    @torch.no_grad()
    def step(self, tokens):
        return self.model(tokens, past_key_values=self.past, use_cache=True).logits


def load_transformers(path: str, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=args.dtype, **kw)
    return model.to(args.device).eval()


def prefilled(model, ctx: int, tokens: torch.Tensor, args: argparse.Namespace, bases: dict) -> tuple:
    """The exact prefill of tokens[:, :ctx] that every lrkv row of this model and context forks from (as eval.ruler
    does), made on first use: (decoder keeping the prompt, prefill seconds)."""
    if id(model) not in bases:
        base = SparseDecoder(model, SparseConfig(policy="streaming", top_k=1, recent=1), gpu_device=args.device,
                             pin_memory=args.device == "cuda", max_context=ctx + args.warmup + args.steps + 1)
        start = time.perf_counter()
        base.prefill(tokens[:, :ctx], logits_to_keep=1, keep_prompt=True)
        sync(args.device)
        bases[id(model)] = base, time.perf_counter() - start
    return bases[id(model)]


def feed(step, tokens: torch.Tensor, ctx: int, positions: range, args: argparse.Namespace,
         rows: int | None = None) -> list[float]:
    """Step with tokens[:, ctx + i] for each i in positions (copied to `rows` rows when given: Lockstep's forks of
    one batch-1 prompt); the seconds of each step."""
    times = []
    for i in positions:
        token = tokens[:, ctx + i : ctx + i + 1]
        start = time.perf_counter()
        step(token if rows is None else token.expand(rows, 1))
        sync(args.device)
        times.append(time.perf_counter() - start)
    return times


def run_case(model, cache: str, lrqk: SparseConfig, ctx: int, tokens: torch.Tensor, args: argparse.Namespace,
             bases: dict) -> dict:
    """Prefill tokens[:, :ctx] (transformers: its own; lrkv: the model's cache or a policy forked from one shared
    prefill, the policy's fit timed with it), then warmup + timed decode steps feeding tokens[:, ctx:]; the row's
    numbers. cache: "transformers", "full", or a policy name."""
    total = args.warmup + args.steps
    if cache == "transformers":
        decoder = TransformersDecoder(model)
        start = time.perf_counter()
        decoder.prefill(tokens[:, :ctx], logits_to_keep=1)
        sync(args.device)
        prefill_s = time.perf_counter() - start
    else:
        base, prefill_s = prefilled(model, ctx, tokens, args, bases)
        start = time.perf_counter()
        decoder = base.full_decoder() if cache == "full" else base.fork(lrqk.with_policy(cache))
        sync(args.device)
        prefill_s += time.perf_counter() - start
    feed(decoder.step, tokens, ctx, range(args.warmup), args)
    before = dataclasses.asdict(decoder.stats)
    times = feed(decoder.step, tokens, ctx, range(args.warmup, total), args)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a busy shared machine
    moved = {k: getattr(decoder.stats, k) - before[k] for k in ("hits", "selections", "bytes_moved")}
    if cache == "transformers":
        kv = [t for layer in decoder.past.layers for t in (layer.keys, layer.values)]
        host, dev = 0, sum(t.numel() * t.element_size() for t in kv)
    elif cache == "full":
        row_bytes = sum(layer.bytes_per_token() for layer in decoder.cache.layers)
        host, dev = 0, row_bytes * decoder.cache.length * args.batch
    else:
        host, dev = decoder.allocated_bytes()
    split = phase_split(decoder, tokens[:, -1:], args) if args.split and isinstance(decoder, SparseDecoder) else None
    return dict(tok_s=args.batch / step_s, ms=1e3 * step_s, dev=dev, host=host, prefill_s=prefill_s,
                moved=moved["bytes_moved"] / args.steps,
                hit=moved["hits"] / moved["selections"] if moved["selections"] else None, split=split)


def run_lockstep(model, methods: list[str], lrqk: SparseConfig, ctx: int, tokens: torch.Tensor,
                 args: argparse.Namespace, bases: dict) -> dict:
    """Every method (full attention: the `full` policy) forked from the shared prefill and stepped as one batch."""
    total = args.warmup + args.steps
    base, prefill_s = prefilled(model, ctx, tokens, args, bases)
    start = time.perf_counter()
    forks = [base.fork(SparseConfig.full(base.max_context) if m == "full" else lrqk.with_policy(m)) for m in methods]
    sync(args.device)
    prefill_s += time.perf_counter() - start
    lock = Lockstep(forks)
    feed(lock.step, tokens, ctx, range(args.warmup), args, rows=len(forks))
    times = feed(lock.step, tokens, ctx, range(args.warmup, total), args, rows=len(forks))
    step_s = sorted(times)[len(times) // 2]
    host, dev = (sum(x) for x in zip(*(f.allocated_bytes() for f in forks)))
    return dict(tok_s=len(forks) / step_s, ms=1e3 * step_s, dev=dev, host=host, prefill_s=prefill_s,
                moved=sum(f.stats.bytes_moved for f in forks) / total, hit=None, split=None)


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights a decode step reads: every parameter once, but only one row of an untied embedding table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if model.cfg.tie_embeddings else total - model.embed.weight.numel() * model.embed.weight.element_size()


def read_bandwidth(model: Transformer, args: argparse.Namespace, repeats: int = 7) -> float:
    """Bytes/s of one token through a linear layer of d_model inputs holding as many bytes as the model's weights in
    the run's dtype: a decode step's weight read, in one matrix. Median of `repeats` after a warm-up."""
    dtype, device, width = args.dtype, args.device, model.cfg.d_model
    rows = max(weight_bytes(model) // (width * torch.empty((), dtype=dtype).element_size()), 1)
    w = torch.full((rows, width), 1e-3, dtype=dtype, device=device)
    x = torch.ones(1, width, dtype=dtype, device=device)
    torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        sync(device)
        times.append(time.perf_counter() - start)
    return w.numel() * w.element_size() / sorted(times)[repeats // 2]


def attended_bytes(model: Transformer, method: str, lrqk: SparseConfig, ctx: int, args: argparse.Namespace) -> int:
    """Cache bytes one decode step must read besides the weights: the whole KV cache for full attention, else the
    GPU pool's rows and the policy's state at this context (the memory plan's numbers)."""
    if method in ("full", "transformers"):
        return ctx * args.batch * model.kv_bytes_per_token(torch.empty((), dtype=args.dtype).element_size())
    plan = SparseDecoder.memory_plan(model.cfg, lrqk.with_policy(method), args.batch, ctx, args.dtype)
    return plan.detail["pool"] + plan.detail["policy"]


def add_floor(rows: list[dict], models: dict, lrqk: SparseConfig, bandwidth: float, args: argparse.Namespace) -> None:
    """read_bytes, floor_ms and ratio for every measured row (the lockstep row reads the weights once)."""
    for r in rows:
        if "ms" not in r:
            continue
        model = models[r["model"]]
        methods = r["methods"] if r["cache"] == "lockstep" else [r["cache"]]
        read = weight_bytes(model) + sum(attended_bytes(model, m, lrqk, r["ctx"], args) for m in methods)
        r.update(read_bytes=read, floor_ms=1e3 * read / bandwidth)
        r["ratio"] = r["ms"] / r["floor_ms"]


# the decode step's named ranges (SparseLayer.decode; lrqk.solve nests in sparse.score, sparse.gather in sparse.pool)
PHASES = ("sparse.store", "sparse.score", "lrqk.solve", "sparse.topk", "sparse.pool", "sparse.gather",
          "sparse.attention")


def phase_split(decoder: SparseDecoder, token: torch.Tensor, args: argparse.Namespace) -> dict:
    """--steps more decode steps under torch.profiler: microseconds per layer-step in each phase (host time; on a
    GPU also device time), nested ranges taken apart. Profiling adds overhead to every op, so `step` (the
    profiled step) exceeds the timed one; the phases' shares are what to read."""
    from torch.profiler import ProfilerActivity, profile

    gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(args.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            decoder.step(token)
        sync(args.device)
        elapsed = time.perf_counter() - start
    per = 1e6 / (args.steps * len(decoder.model.layers))  # us per layer-step
    totals = {e.key: (e.cpu_time_total * per / 1e6, e.device_time_total * per / 1e6 if gpu else None)
              for e in prof.key_averages() if e.key in PHASES}
    t = {k: totals.get(k, (0.0, 0.0 if gpu else None)) for k in PHASES}

    def minus(a, b):
        return tuple(None if x is None else x - y for x, y in zip(a, b))

    named = {"proxy solve": t["lrqk.solve"], "scoring": minus(t["sparse.score"], t["lrqk.solve"]),
             "top-k": t["sparse.topk"], "hit/miss": minus(t["sparse.pool"], t["sparse.gather"]),
             "gather": t["sparse.gather"], "attention": t["sparse.attention"], "store": t["sparse.store"]}
    step = elapsed * per
    rest = step - sum(t[k][0] for k in PHASES if k not in ("lrqk.solve", "sparse.gather"))  # those two are nested
    return {**named, "rest of the layer (projections, MLP)": (rest, None), "step": (step, None)}


def print_split(rows: list[dict]) -> None:
    """One line per profiled LRQK case: us per layer-step of each phase, host (and device) time."""
    rows = [r for r in rows if r.get("split")]
    if not rows:
        return
    names = list(rows[0]["split"])
    print("\nLRQK decode, us per layer-step (host time; /device time on a GPU), profiled:")
    head = ("context", "cache", *names)
    lines = [(fmt_ctx(r["ctx"]), r["cache"], *(f"{h:.0f}" + ("" if d is None else f"/{d:.0f}")
                                              for h, d in r["split"].values())) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for line in (head, *lines):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def full_fits(model, ctx: int, args: argparse.Namespace) -> str | None:
    """None if a full cache of this context fits the free GPU memory, else why not (CPU runs always try)."""
    if args.device != "cuda" or not isinstance(model, Transformer):
        return None
    need = model.kv_bytes_per_token(torch.empty((), dtype=args.dtype).element_size()) * (ctx + 64) * args.batch
    free, _ = torch.cuda.mem_get_info()
    return None if need < 0.8 * free else f"needs {need / 2**30:.1f} GiB KV, {free / 2**30:.1f} GiB free"


def measure(label: str, model: Transformer, cache: str, lrqk: SparseConfig, ctx: int, tokens: torch.Tensor,
            args: argparse.Namespace, bases: dict) -> dict:
    row = dict(ctx=ctx, model=label, cache=cache)
    why = full_fits(model, ctx, args) if cache in ("full", "transformers") else None
    if why:
        return {**row, "skip": why}
    try:
        if cache == "lockstep":
            methods = ["full", *args.policies]
            return {**row, "methods": methods, **run_lockstep(model, methods, lrqk, ctx, tokens, args, bases)}
        return {**row, **run_case(model, cache, lrqk, ctx, tokens, args, bases)}
    except (torch.OutOfMemoryError, MemoryPlanError) as e:
        return {**row, "skip": str(e).splitlines()[0][:60]}
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def fmt_ctx(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else str(n)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_table(rows: list[dict], floor: bool) -> None:
    head = ("context", "model", "cache", "tok/s", "ms/step", "x base", "dev KV", "host KV", "H2D/step", "hit rate",
            "prefill s") + (("floor ms", "x floor") if floor else ())
    lines = []
    for r in rows:
        # "x base": speed relative to the first measured row of the same context (MHA-full, or the HF model's full)
        base = next((b["tok_s"] for b in rows if b["ctx"] == r["ctx"] and "tok_s" in b), None)
        if "skip" in r:
            lines.append((fmt_ctx(r["ctx"]), r["model"], r["cache"], "-", "-", "-", "-", "-", "-", "-", r["skip"])
                         + (("-", "-") if floor else ()))
            continue
        lines.append((fmt_ctx(r["ctx"]), r["model"], r["cache"], f"{r['tok_s']:.1f}", f"{r['ms']:.2f}",
                      f"{r['tok_s'] / base:.2f}", fmt_bytes(r["dev"]), fmt_bytes(r["host"]) if r["host"] else "-",
                      fmt_bytes(r["moved"]), "-" if r["hit"] is None else f"{100 * r['hit']:.1f}%",
                      f"{r['prefill_s']:.2f}") + ((f"{r['floor_ms']:.1f}", f"{r['ratio']:.1f}") if floor else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for line in (head, *lines):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def describe(label: str, cfg: ModelConfig, model: Transformer, args: argparse.Namespace) -> str:
    elt = torch.empty((), dtype=args.dtype).element_size()
    shape = f"{cfg.attn}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads x {cfg.dh}"
    if cfg.attn == "lrkv":
        shape += f", ranks k/v {cfg.rank_k}/{cfg.rank_v}"
    if cfg.attn == "gqa":
        shape += f", {cfg.kv_heads} KV heads"
    return (f"  {label}: {shape}, vocab {cfg.vocab_size}, {model.num_params() / 1e6:.1f}M params, "
            f"KV {model.kv_bytes_per_token(elt)} B/token")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hf_export:
        hf = open_export(args.hf_export).model(args.device, args.dtype)
        models = [("hf", hf, "full")] + [("hf", hf, policy) for policy in args.policies]
        if args.policies and args.batch == 1:
            models.append(("hf", hf, "lockstep"))
        if args.transformers:
            models.insert(0, ("transformers", load_transformers(args.transformers, args), "transformers"))
        cfgs = {f"hf ({args.hf_export})": (hf.cfg, hf)}
        counted = {"hf": hf, "transformers": hf}  # the bytes a step reads, from lrkv's copy of the same model
    else:
        name = args.config or ("lrkv_125m.yaml" if args.device == "cuda" else "lrkv_debug.yaml")
        lrkv_cfg = dataclasses.replace(load_config(name).model, lrkv_b_init="normal")
        mha_cfg = dataclasses.replace(lrkv_cfg, attn="mha", n_kv_head=None)
        mha, lrkv = random_model(mha_cfg, args), random_model(lrkv_cfg, args)
        models = [("MHA", mha, "full"), ("LRKV", lrkv, "full")] + [("LRKV", lrkv, p) for p in args.policies]
        if args.policies and args.batch == 1:
            models.append(("LRKV", lrkv, "lockstep"))
        cfgs = {"MHA": (mha_cfg, mha), f"LRKV ({name})": (lrkv_cfg, lrkv)}
        counted = {"MHA": mha, "LRKV": lrkv}
    head_dim = next(iter(cfgs.values()))[0].dh
    # without a preset: the paper's rank at head_dim 128 scaled to this head_dim, and a top-k per device
    base = SparseConfig(top_k=2048 if args.device == "cuda" else 256).tuned(rank=max(head_dim // 4, 1))
    lrqk = sparse_config(args, base)
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    biggest = max(counted.values(), key=weight_bytes)
    bandwidth = [read_bandwidth(biggest, args)] if args.floor else []
    say(f"decode benchmark on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"dtype {str(args.dtype).removeprefix('torch.')}, batch {args.batch}, {args.warmup} warmup + "
          f"{args.steps} timed decode steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, (cfg, model) in cfgs.items():
        say(describe(label, cfg, model, args))
    say(f"  sparse: {lrqk.summary()} (proxy shared: per layer for lrkv, per query head for mha-gqa), policies "
          f"{','.join(args.policies)}, offloaded row store{' (pinned)' if args.device == 'cuda' else ''}")
    vocab = next(iter(cfgs.values()))[0].vocab_size
    rows = []
    for ctx in args.contexts:
        tokens = prompt_tokens(args, vocab, ctx + args.warmup + args.steps)
        bases = {}  # one exact prefill per model, forked by its rows
        for label, model, cache in models:
            rows.append(measure(label, model, cache, lrqk, ctx, tokens, args, bases))
            print(f"  done {fmt_ctx(ctx)} {label}-{cache}", file=sys.stderr, flush=True)
    if args.floor:
        bandwidth.append(read_bandwidth(biggest, args))
        say(f"  read bandwidth (one token through a {weight_bytes(biggest) / 2**30:.2f} GiB linear layer): "
            f"{bandwidth[0] / 1e9:.1f} GB/s before the rows, {bandwidth[1] / 1e9:.1f} GB/s after; "
            "floor from their mean")
        add_floor(rows, counted, lrqk, sum(bandwidth) / 2, args)
    if args.json:
        for r in rows:
            keys = {"step_ms": "ms", "floor_ms": "floor_ms", "ratio": "ratio", "read_bytes": "read_bytes",
                    "prefill_s": "prefill_s", "tok_s": "tok_s", "skip": "skip"}
            print(json.dumps({"model": r["model"], "context": r["ctx"], "method": r["cache"],
                              **{k: r[key] for k, key in keys.items() if key in r}}))
        return
    print_table(rows, args.floor)
    print_split(rows)


def prompt_tokens(args: argparse.Namespace, vocab: int, n: int) -> torch.Tensor:
    """(batch, n) ids: --text tokenized and repeated to length n, else uniform random ids (seeded)."""
    if args.text:
        tok = open_export(args.hf_export).tokenizer
        ids = torch.tensor(tok.encode(Path(args.text).read_text()).ids)
        ids = ids.repeat(n // len(ids) + 1)[:n]
        return ids.expand(args.batch, n).to(args.device)
    return torch.randint(0, vocab, (args.batch, n), generator=torch.Generator().manual_seed(0)).to(args.device)


if __name__ == "__main__":
    main()
