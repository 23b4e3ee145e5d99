"""One entry point.

    python -m eval run --export DIR [--suite quick|full] [--source shakespeare] [--out REPORT_DIR]
        perplexity, KV memory (measured vs formula), head diversity, long-context retrieval with the full and the
        LRQK cache, and the LRQK agreement sweep of one export -> REPORT_DIR/summary.md + PNGs
    python -m eval {perplexity,long_context,lrqk_agreement,kv_memory,head_diversity,compare} [ARGS]
        one module's own command line
"""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys
import time
from pathlib import Path

MODULES = ("perplexity", "long_context", "ruler", "lrqk_agreement", "kv_memory", "head_diversity", "compare", "models")
SUITE_NAMES = ("full", "quick")  # the keys of SUITES below, for the parser (built before torch loads)


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="run",
                            help="`python -m eval run --help` lists its options; a module name runs that module")
    r = sub.add_parser("run", prog="python -m eval run", help="evaluate one export into a report folder",
                       description="Evaluate one export into REPORT_DIR/summary.md (+ perplexity.json and PNGs).")
    r.add_argument("--export", required=True, help="export folder (config.json, model.safetensors, tokenizer.json)")
    r.add_argument("--suite", choices=SUITE_NAMES, default="quick",
                   help="quick (default): 8K perplexity tokens, passkey and niah_single, 5 items, 1 agreement "
                        "prompt; full: 64K tokens, every task at 1x and 2x max_seq_len, 20 items, 4 prompts")
    r.add_argument("--source", default="shakespeare", help="text for perplexity and the agreement prompts")
    r.add_argument("--context", type=int, default=128, help="perplexity window (capped at max_seq_len)")
    r.add_argument("--threads", type=int, default=1, help="torch threads; decode steps are too small for more")
    r.add_argument("--out", default="reports/eval", help="report folder (default %(default)s)")
    return ap


if __name__ == "__main__":  # --help, usage errors and a module's command line are answered before torch loads
    if sys.argv[1:2] and sys.argv[1] in MODULES:  # `python -m eval X ARGS` runs as `python -m eval.X ARGS`
        runpy.run_module(f"eval.{sys.argv.pop(1)}", run_name="__main__", alter_sys=True)
        sys.exit()
    parser().parse_args()

import torch  # noqa: E402

from eval import head_diversity, kv_memory, long_context, lrqk_agreement, perplexity  # noqa: E402
from eval.common import cli, markdown_table  # noqa: E402
from lrkv.export import open_export  # noqa: E402
from lrkv.inference.sparse import SparseConfig  # noqa: E402
from lrkv.inference.sparse.plan import SPARSE_ATTENTION  # noqa: E402

SUITES = {
    "quick": {"ppl_tokens": 8192, "tasks": ["passkey", "niah_single"], "lengths": [1], "n": 5,
              "prompts": 1, "ranks": [4, 8], "top_ks": [16, 32]},
    "full": {"ppl_tokens": 65536, "tasks": sorted(long_context.TASKS), "lengths": [1, 2], "n": 20,
             "prompts": 4, "ranks": [4, 8, 16], "top_ks": [16, 32, 64]},
}  # lengths are multiples of the model's max_seq_len


def run(export: str, suite: str, source: str, context: int, out: Path) -> str:
    s, t0 = SUITES[suite], time.time()
    ex = open_export(export)
    model, tok = ex.model(), ex.tokenizer
    m = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Evaluation of `{export}` ({suite} suite)\n\n"
             f"attn {m.attn}, {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads x {m.dh}, "
             f"{model.num_params():,} parameters, max_seq_len {m.max_seq_len}\n"]

    tokens = perplexity.source_tokens(tok, source, "val")
    ppl = perplexity.perplexity(model, tok, tokens, s["ppl_tokens"], min(context, m.max_seq_len))
    parts += [f"\n## Perplexity ({source}, held-out split)\n\n", markdown_table([ppl])]

    kv = kv_memory.kv_rows([(Path(export).parent.name or export, m)])
    kv_memory.plot(kv, out / "kv_memory.png")
    parts += ["\n## KV cache (bf16; measured from cache tensors vs formula)\n\n", markdown_table(kv),
              "\n![kv](kv_memory.png)\n"]

    parts += ["\n## Head diversity (docs/lrkv.md §7)\n\n", head_diversity.run([export], [m.attn], out),
              "\n![heads](head_diversity.png)\n"]

    lrqk_ok = m.attn in SPARSE_ATTENTION
    lrqk = SparseConfig(top_k=m.max_seq_len // 8, recent=16, sinks=4).tuned(rank=min(8, m.dh))
    lengths = [f * m.max_seq_len for f in s["lengths"]]
    tasks = [t for t in s["tasks"] if fits(t, tok, min(lengths))]
    rows = long_context.evaluate(model, tok, tasks, lengths, s["n"], ["full", "lrqk"] if lrqk_ok else ["full"],
                                 lrqk, [0.1, 0.3, 0.5, 0.7, 0.9])
    skipped = sorted(set(s["tasks"]) - set(tasks))
    settings = lrqk.summary() if lrqk_ok else f"n/a for {m.attn}"
    parts += [f"\n## Long-context retrieval (LRQK {settings})\n\n", markdown_table(rows),
              f"\nSkipped (prompt does not fit {min(lengths)} tokens): {skipped}\n" if skipped else ""]

    if lrqk_ok:
        prefix, steps = 3 * m.max_seq_len // 4, m.max_seq_len // 4
        windows = lrqk_agreement.text_windows(export, s["prompts"], prefix + steps, source, "val")
        agree = lrqk_agreement.sweep(model, windows, prefix, lrqk, s["ranks"], s["top_ks"])
        lrqk_agreement.plot(agree, out / "lrqk_agreement.png", prefix)
        parts += [f"\n## LRQK vs full ({s['prompts']} prompts, {prefix} prefill + {steps} teacher-forced steps)\n\n",
                  markdown_table(agree), "\n![lrqk](lrqk_agreement.png)\n"]

    parts.append(f"\nwall time {time.time() - t0:.0f} s\n")
    text = "".join(parts)
    (out / "summary.md").write_text(text)
    (out / "perplexity.json").write_text(json.dumps(ppl))
    return text


def fits(task: str, tok, length: int) -> bool:
    try:
        long_context.make_item(task, tok, length, seed=0)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODULES:
        importlib.import_module(f"eval.{argv[0]}").main(argv[1:])
        return
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.export, args.suite, args.source, args.context, Path(args.out)))


if __name__ == "__main__":
    cli(main)
