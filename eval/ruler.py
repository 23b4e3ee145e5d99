"""RULER-style suite: full attention and every token-selection policy of the sparse decoder at one token budget.

    python -m eval.ruler --export DIR --lengths 1024,2048,4096,8192 \
        --methods full,lrqk,exact,quest,loki,h2o,streaming --budget 256 --n 5

Tasks are RULER's synthetic families (eval/long_context.py builds the items from code and a seed, sized with the
export's tokenizer so that prompt + generation fit the length; the haystack is RULER's noise sentences, since
the essay file is not available): niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe
and qa (who says a quoted line, among documents drawn from the embedded corpus).

Each item is prefilled **once**, exactly, and every method decodes from that one prefilled state (SparseDecoder.fork;
full attention is the `full` policy, every row selected); the answer is decoded greedily until the export's EOS or
the task's cap. Scores are RULER's string_match_all. Two protocols (--protocol):
- dense-question (the LRQK paper's and ShadowKV's): context and question are prefilled exactly, only the answer is
  decoded sparsely;
- sparse-question: the context is prefilled, the question fed token by token through each method's sparse path.

Budget: `--budget B` rows attended per decode step and selection stream (a query head here, as in LRQK's
reference): `sinks + recent + top_k = B` for every method. A method is a policy name (lrkv/inference/sparse/registry.py)
with optional overrides of the budget, a SparseConfig field or one of the policy's knobs, e.g. `lrqk:rank=8`,
`lrqk:budget=64`, `lrqk:sinks=0`, `quest:page=8:dense_layers=2` (the ablations run in one pass over the same
prefills). `loki:basis=offline` fits Loki's basis once per export on corpus text (the paper's offline basis) and
keeps it beside the export; plain `loki` fits it on each prompt's own keys (an oracle basis).

Per method the report gives the GPU-resident state a bf16 deployment would hold at the item's length (full: the
KV cache; sparse: slot pool + maps + the policy's own state, from the decoder's memory plan) and the CPU->GPU
bytes per decode step, measured through the hit/miss pool and, for comparison, without it (every selected row
fetched every step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lrkv.inference.sparse.config import SparseConfig, add_sparse_args, sparse_config
from lrkv.inference.sparse.registry import POLICIES

ROOT = Path(__file__).resolve().parents[1]
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")
# RULER's tokens_to_generate per task; the decode stops earlier at EOS or once every answer could have been written
GEN_CAP = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128, "vt": 30,
           "cwe": 120, "fwe": 50, "qa": 32}
PROTOCOLS = ("dense-question", "sparse-question")
LOKI_BASIS = "loki_basis.safetensors"  # `loki:basis=offline`: fitted once per export on corpus text
DTYPE_NAMES = ("bf16", "fp32")  # generator.DTYPES' keys, spelled here so --help needs no torch (tests/test_cli.py)


def shard(text: str) -> tuple[int, int]:
    j, _, n = text.partition("/")
    if not (j.isdigit() and n.isdigit() and int(j) < int(n)):
        raise argparse.ArgumentTypeError(f"expected J/N with 0 <= J < N, got '{text}'")
    return int(j), int(n)


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    ap = argparse.ArgumentParser(prog="python -m eval.ruler", description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", help="an export folder (e.g. from python -m eval.models smollm2 DIR); required "
                                     "unless --report-only")
    ap.add_argument("--lengths", default="1024,2048,4096", help="comma list of context lengths in tokens")
    ap.add_argument("--tasks", default=",".join(RULER_TASKS), help=f"comma list of {', '.join(RULER_TASKS)}")
    ap.add_argument("--methods", default=",".join(["full", *(p for p in POLICIES if p != "full")]),
                    help=f"comma list of policies ({' '.join(POLICIES)}), each with optional :key=value overrides "
                         "(budget, a SparseConfig field or a knob of the policy), e.g. lrqk:rank=8")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="dense-question",
                    help="dense-question: context and question prefilled exactly, the answer decoded sparsely (the "
                         "LRQK paper's protocol); sparse-question: the question also decoded through each method "
                         "(default %(default)s)")
    ap.add_argument("--no-chat", action="store_true",
                    help="feed the bare prompt; by default each item is the user turn of the export's chat template "
                         "when it carries one (instruct models), as RULER prompts each model")
    ap.add_argument("--budget", type=int, default=256, help="rows attended per step and stream: sinks+recent+top_k")
    add_sparse_args(ap, {"recent": 32, "sinks": 4, "rank": 32})  # top_k: what the budget leaves
    ap.add_argument("--n", type=int, default=5, help="items per task and length")
    ap.add_argument("--seed", type=int, default=0, help="item i is generated from seed + i (default %(default)s)")
    ap.add_argument("--start", type=int, default=0, help="first item index (to finish an interrupted run: items "
                                                         "start..n-1; merge the records with --report-only)")
    ap.add_argument("--recall", action="store_true", help="also measure recall@k of each policy vs exact top-k")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; with --jobs: split among them)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes, each decoding every jobs-th item with its share of the threads (the "
                         "decode loop is many small ops that one process does not spread over cores); records "
                         "merged in order")
    ap.add_argument("--shard", type=shard, metavar="J/N", help="only items J, J+N, J+2N, ... (what --jobs runs)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                    help="weights and KV rows (bf16: ~3x faster prefill on CPUs with AMX/avx512_bf16; default fp32)")
    ap.add_argument("--out", default="reports/ruler",
                    help="report folder: ruler.md, ruler_accuracy.png, records.jsonl, settings.json")
    ap.add_argument("--report-only", nargs="+", metavar="RECORDS",
                    help="no run: write the report from records.jsonl files of earlier (e.g. parallel) runs")
    return ap


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402

from eval.common import cli, markdown_table, plt, save_figure  # noqa: E402
from eval.long_context import answer_budget, corpus_speeches, encode, make_item, string_match_all  # noqa: E402
from lrkv.export import open_export  # noqa: E402
from lrkv.inference.generator import DTYPES  # noqa: E402
from lrkv.inference.sparse import Lockstep, SparseDecoder, memory_plan  # noqa: E402
from lrkv.inference.sparse.plan import geometry  # noqa: E402


def parse_method(spec: str, budget: int, base: SparseConfig) -> tuple[str, SparseConfig | None]:
    """'full' -> None; 'quest' / 'lrqk:rank=8:budget=64' -> `base` with that policy, the overrides and, unless one
    sets it, top_k = budget - recent - sinks."""
    name, *overrides = spec.split(":")
    if name == "full":
        if overrides:
            raise ValueError(f"method '{spec}': full attention takes no settings")
        return spec, None
    if name not in POLICIES:
        raise ValueError(f"unknown method '{name}' in '{spec}', expected one of {', '.join(POLICIES)}")
    cfg = base.with_policy(name)
    engine = {f.name: f.type for f in dataclasses.fields(SparseConfig) if f.name not in ("policy", "knobs")}
    own = {f.name: f.type for f in dataclasses.fields(cfg.knobs)}
    settings, knobs, b = {}, {}, budget
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or key not in {**engine, **own, "budget": int}:
            raise ValueError(f"method '{spec}': '{o}' is not key=value with key budget, a SparseConfig field "
                             f"({', '.join(engine)}) or a knob of {name} ({', '.join(own) or 'none'})")
        if key == "budget":
            b = int(value)
        else:
            kind = str({**engine, **own}[key])
            parsed = (int(value) if kind.startswith("int") else float(value) if kind == "float"
                      else value.lower() in ("1", "true") if kind == "bool" else value)
            (knobs if key in own else settings)[key] = parsed
    cfg = dataclasses.replace(cfg, **settings).tuned(**knobs)
    top_k = b - cfg.recent - cfg.sinks
    if top_k < 1:
        raise ValueError(f"method '{spec}': budget {b} leaves no top-k after recent {cfg.recent} + sinks {cfg.sinks}")
    return spec, cfg if "top_k" in settings else dataclasses.replace(cfg, top_k=top_k)


@torch.inference_mode()  # no view or version tracking: decode steps ~10% faster than under no_grad here
def run_item(base: SparseDecoder, ctx: list[int], question: list[int], cap: int, methods, eos: set[int]) -> dict:
    """Prefill once, fork every method, then decode the question and answer with all methods as one batch (Lockstep:
    one model forward per step). Full attention is the `full` policy's fork, every row resident (tested equal to the
    model's own cache). Per method: (new tokens, stats when its answer ended, decode seconds and batched steps,
    shared)."""
    logits = base.prefill(torch.tensor([ctx]), keep_prompt=True, logits_to_keep=1)
    decoders = [base.fork(SparseConfig.full(base.max_context) if cfg is None else cfg) for _, cfg in methods]
    M = len(methods)
    lock, live = Lockstep(decoders), list(range(M))  # live: the methods still decoding, in batch order
    t0 = time.perf_counter()
    logits = logits.expand(M, -1, -1)
    for t in question:
        logits = lock.step(torch.full((M, 1), t))
    outs, ended, steps = [[] for _ in range(M)], [None] * M, len(question)
    for _ in range(cap):
        nxt = logits[:, -1].argmax(-1)
        for i, t in zip(live, nxt.tolist()):
            if t in eos:
                ended[i] = copy.deepcopy(decoders[i].stats)
            else:
                outs[i].append(t)
        still = [j for j, i in enumerate(live) if ended[i] is None]
        if not still:
            break
        if len(still) < len(live):  # a method that stopped leaves the batch
            live = [live[j] for j in still]
            lock, nxt = Lockstep([decoders[i] for i in live]), nxt[still]
        logits = lock.step(nxt[:, None])
        steps += 1
    seconds = time.perf_counter() - t0
    return {label: (outs[i], ended[i] or decoders[i].stats, seconds, steps) for i, (label, _) in enumerate(methods)}


def split_answer_prefix(question: str) -> tuple[str, str]:
    """(query, answer prefix) of an item's question, as RULER's templates keep them apart: the prefix starts at the
    last "Answer: " (vt, cwe, fwe, qa) or after the last question mark (the niah tasks)."""
    cut = question.rfind("Answer: ")
    if cut >= 0:
        return question[:cut].rstrip(" "), question[cut:]
    cut = question.rfind("? ") + 1
    return question[:cut], question[cut:].lstrip(" ")


def loki_basis(export, dtype, windows: int = 4, length: int = 2048) -> Path:
    """The export's offline Loki basis (LOKI_BASIS beside its weights), fitted on first use on `windows` windows of
    `length` tokens of the embedded corpus (calibration text, as the paper fits offline; qa's documents come from
    the same plays)."""
    from lrkv.data import shakespeare_files
    from lrkv.inference.sparse.policies.loki import fit_basis

    path = export.path / LOKI_BASIS
    if path.is_file():
        return path
    ids = []
    for file in shakespeare_files():
        ids += encode(export.tokenizer, file.read_text(encoding="utf-8"))
        if len(ids) >= windows * length:
            break
    print(f"fitting Loki's offline basis on {windows} x {length} corpus tokens -> {path}", flush=True)
    chunks = torch.tensor(ids[: windows * length]).view(windows, length)
    return fit_basis(export.model(dtype=dtype), list(chunks), path)


def resident_bytes(model, cfg: SparseConfig | None, length: int) -> int:
    """GPU-resident bytes at `length` tokens in bf16: the full KV cache, or the sparse decoder's GPU plan."""
    if cfg is None:
        return length * model.kv_bytes_per_token(2)
    return memory_plan(model.cfg, cfg, 1, length, torch.bfloat16).gpu_bytes


def item_order(lengths, tasks, start: int, n: int) -> list[tuple[int, str, int]]:
    """(length, task, item) in the order a run decodes and reports them."""
    return [(length, task, i) for length in lengths for task in tasks for i in range(start, n)]


def evaluate(model, tok, model_cfg, tasks, lengths, n, methods, eos, seed=0, log=print,
             sink: Path | None = None, start: int = 0, shard: tuple[int, int] = (0, 1),
             protocol: str = "dense-question", chat=None) -> list[dict]:
    """One row per (length, task, method, item): score, generated text, bytes, time; each item's rows are also
    appended to `sink` (JSON lines) as soon as they exist, so an interrupted run keeps what it measured.
    shard (j, N): only the j-th of every N items in (length, task, item) order. protocol: PROTOCOLS. chat: a
    function wrapping a prompt as the model's user turn (Export.chat_prompt), or None for the bare prompt."""
    records, todo, began = [], item_order(lengths, tasks, start, n)[shard[0]::shard[1]], time.perf_counter()
    for done, (length, task, i) in enumerate(todo, 1):
        cap = GEN_CAP[task]
        item = make_item(task, tok, length - cap, seed + i, depth=[0.1, 0.3, 0.5, 0.7, 0.9][i % 5])
        cap = min(cap, answer_budget(tok, item))
        ctx_text, question_text = item.context, item.question
        if chat is not None:  # as RULER: the query in the user turn, its answer prefix after the assistant's turn
            query, prefix = split_answer_prefix(item.question)
            wrapped = chat(item.context + query)
            cut = wrapped.rfind(query)
            if cut < 0:
                raise ValueError(f"the chat template changed the text of a {task} question; run with --no-chat")
            ctx_text, question_text = wrapped[:cut], wrapped[cut:] + prefix
        ctx, question = encode(tok, ctx_text), encode(tok, question_text)
        if protocol == "dense-question":  # the question joins the exact prefill
            ctx, question = ctx + question, []
        base = SparseDecoder(model, SparseConfig(policy="streaming", top_k=1, recent=1),
                             max_context=len(ctx) + len(question) + cap + 1)
        t0 = time.perf_counter()
        results = run_item(base, ctx, question, cap, methods, eos)
        del base
        line = []
        for label, cfg in methods:
            tokens, stats, seconds, batch_steps = results[label]
            text = tok.decode(tokens)
            steps = max(stats.steps, 1)
            row_bytes = 2 * geometry(model_cfg, cfg, 1).row if cfg is not None else 0
            rec = {"length": length, "task": task, "item": i, "method": label, "protocol": protocol,
                   "chat": chat is not None,
                   "prompt": len(ctx) + len(question),
                   "score": 100.0 * string_match_all(text, item.answers), "output": text,
                   "answers": item.answers, "gpu_bytes": resident_bytes(model, cfg, len(ctx) + len(question)),
                   "h2d_per_step": stats.misses * row_bytes / steps,
                   "h2d_no_cache_per_step": stats.selections * row_bytes / steps,
                   "decode_s": seconds, "steps": stats.steps, "batch_steps": batch_steps}
            if stats.recall is not None:
                rec["recall"] = stats.recall
            records.append(rec)
            line.append(f"{label} {rec['score']:.0f}")
        if sink is not None:
            with sink.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records[-len(methods):])
        elapsed = time.perf_counter() - began
        log(f"[{done}/{len(todo)}] {length} {task} #{i}: prompt {len(ctx) + len(question)} tok, "
            f"{time.perf_counter() - t0:.1f} s: " + ", ".join(line)
            + f" | elapsed {elapsed / 60:.1f} min, ETA {elapsed / done * (len(todo) - done) / 60:.1f} min", flush=True)
    return records


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def tables(records: list[dict], methods: list[str]) -> str:
    """Per length: task x method accuracy (+ mean); then per method: bytes and speed over all items."""
    parts = []
    for length in sorted({r["length"] for r in records}):
        at = [r for r in records if r["length"] == length]
        tasks = [t for t in RULER_TASKS if any(r["task"] == t for r in at)]
        rows = []
        for task in tasks:
            row = {"task": task, "n": sum(1 for r in at if r["task"] == task and r["method"] == methods[0])}
            row.update({m: mean(r["score"] for r in at if r["task"] == task and r["method"] == m) for m in methods})
            rows.append(row)
        # mean over the tasks a method ran (merged partial runs may lack some); missing cells print empty
        means = {m: mean(row[m] for row in rows if row[m] == row[m]) for m in methods}
        rows.append({"task": "**mean**", "n": "", **means})
        rows = [{k: ("" if v != v else v) for k, v in row.items()} for row in rows]
        parts.append(f"### {length} tokens (accuracy %)\n\n" + markdown_table(rows, ["task", "n", *methods]))
    cost = []
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        row = {"method": m, "GPU MiB (bf16, mean prompt)": mean(r["gpu_bytes"] for r in mine) / 2**20,
               "H2D KiB/step": mean(r["h2d_per_step"] for r in mine) / 1024,
               "H2D KiB/step w/o hit-miss": mean(r["h2d_no_cache_per_step"] for r in mine) / 1024,
               "decode ms/step (all methods batched)": 1000 * sum(r["decode_s"] for r in mine)
               / max(sum(r["batch_steps"] for r in mine), 1)}
        if any("recall" in r for r in mine):
            per_layer = [mean(r["recall"][i] for r in mine if "recall" in r) for i in range(len(mine[0]["recall"]))]
            row["recall@k (mean; min layer)"] = f"{mean(per_layer):.3f}; {min(per_layer):.3f}"
        cost.append(row)
    parts.append("### Memory and traffic per method (bf16 bytes; CPU->GPU = rows fetched into the GPU pool)\n\n"
                 + markdown_table(cost))
    return "\n".join(parts)


def plot(records: list[dict], methods: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = sorted({r["length"] for r in records})
    for m in methods:
        ys = [mean(mean(r["score"] for r in records if r["length"] == L and r["method"] == m and r["task"] == t)
                   for t in {r["task"] for r in records if r["length"] == L}) for L in lengths]
        ax.plot(lengths, ys, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser()
    args = ap.parse_args(argv)
    if args.report_only:
        records = [json.loads(line) for p in args.report_only for line in Path(p).read_text().splitlines() if line]
        specs = list(dict.fromkeys(r["method"] for r in records))
        return write_report(records, specs, Path(args.out), f"records from {', '.join(args.report_only)}")
    if not args.export:
        ap.error("--export is required (unless --report-only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = sparse_config(args, SparseConfig(measure_recall=args.recall))
    specs = [s for s in args.methods.split(",") if s]
    methods = [parse_method(s, args.budget, base) for s in specs]
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(RULER_TASKS))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; expected some of {list(RULER_TASKS)}")
    export = open_export(args.export)
    model_cfg, tok, eos = export.config, export.tokenizer, set(export.eos_ids)
    offline = [i for i, (_, cfg) in enumerate(methods)
               if cfg is not None and cfg.policy == "loki" and cfg.knobs.basis == "offline"]
    if offline:
        basis = str(loki_basis(export, DTYPES[args.dtype]))
        for i in offline:
            label, cfg = methods[i]
            methods[i] = label, dataclasses.replace(cfg, knobs=dataclasses.replace(cfg.knobs, basis=basis))
    for _, cfg in methods:
        if cfg is not None:
            cfg.validate(model_cfg.dh)
    lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    if args.jobs > 1 and args.shard is None:
        records = run_jobs(sys.argv[1:] if argv is None else argv, args, out)
        rank = {key: n for n, key in enumerate(item_order(lengths, tasks, args.start, args.n))}
        records.sort(key=lambda r: (rank[r["length"], r["task"], r["item"]], specs.index(r["method"])))
        (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        model = export.model(dtype=DTYPES[args.dtype])
        if "qa" in tasks:
            corpus_speeches()  # parse the corpus up front, not in the middle of a long run
        records = evaluate(model, tok, model_cfg, tasks, lengths, args.n, methods, eos, args.seed,
                           sink=out / "records.jsonl", start=args.start, shard=args.shard or (0, 1),
                           protocol=args.protocol,
                           chat=export.chat_prompt if export.chat_template and not args.no_chat else None)
        if args.shard:  # a worker of --jobs: the parent writes the report
            return records
    wall = time.time() - t0
    settings = {label: (dataclasses.asdict(cfg) if cfg else "full") for label, cfg in methods}
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    return write_report(records, specs, out, f"`{args.export}`, {args.protocol} protocol, budget {args.budget} "
                                             f"rows/step (sinks {args.sinks}, "
                                             f"recent {args.recent}), rank {args.rank}, {args.dtype}, "
                                             f"{args.jobs} job(s), wall {wall / 60:.1f} min")


def run_jobs(argv: list[str], args, out: Path) -> list[dict]:
    """--jobs N: this command N times, worker j on items j, j+N, ... with its share of the threads, writing to
    OUT/shard<j>/records.jsonl; returns their records (an item's rows do not depend on which worker decoded it)."""
    each = max(1, (args.threads or torch.get_num_threads()) // args.jobs)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    folders = [out / f"shard{j}" for j in range(args.jobs)]
    workers = [subprocess.Popen([sys.executable, "-m", "eval.ruler", *argv, "--jobs", "1", "--shard",
                                 f"{j}/{args.jobs}", "--threads", str(each), "--out", str(folder)], env=env)
               for j, folder in enumerate(folders)]
    try:
        failed = [j for j, w in enumerate(workers) if w.wait() != 0]
    finally:
        for w in workers:
            w.kill()  # a no-op for a finished worker; stops the others if the parent is interrupted
    if failed:
        raise RuntimeError(f"eval.ruler worker(s) {failed} failed; what they measured is in "
                           f"{', '.join(str(folders[j] / 'records.jsonl') for j in failed)}")
    return [json.loads(line) for folder in folders for line in (folder / "records.jsonl").read_text().splitlines()
            if line]


def write_report(records: list[dict], specs: list[str], out: Path, about: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    plot(records, specs, out / "ruler_accuracy.png")
    report = (f"# RULER-style suite\n\n{about}\n\n" + tables(records, specs) + "\n![accuracy](ruler_accuracy.png)\n")
    (out / "ruler.md").write_text(report)
    print(report)
    print(f"report: {out / 'ruler.md'}, plot: {out / 'ruler_accuracy.png'}, records: {out / 'records.jsonl'}")
    return records

if __name__ == "__main__":
    cli(main)
