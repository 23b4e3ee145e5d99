"""The small replication: MHA, GQA, MQA, MLA and LRKV at the debug size, same token budget, same data.

Language modelling: `train.py --config lrkv_debug.yaml` once per variant (eval.common.VARIANTS) on the embedded
corpus; the first run trains the tokenizer and the others reuse it, so every variant sees the same tokens and
the same validation batches. Reported: validation loss against cumulative training FLOPs (steps x tokens/step x
`num_flops_per_token`) and against KV bytes per token, and docs/lrkv.md §6's savings: the target is MHA's
final (smoothed) validation loss; s* is the first step (linear interpolation between validation points) where a
variant's smoothed loss reaches it; step saving = 1 - s*/S_mha, FLOP saving = 1 - C_variant(s*)/C_mha(S_mha).
The trained exports also go through the head-diversity analysis (eval.head_diversity).

Token-pair recall (eval/recall_study.py): the same debug-size variants trained from scratch on synthetic
MQAR-style sequences in which each key-value pair is one token, for the same steps and seeds, scored on held-out
sequences (not eval.long_context's `mqar`, which asks a trained export to retrieve key=value pairs written as text).

    python -m eval.compare [--steps 150] [--mqar-steps 600 --mqar-seeds 3] [--variants mha,gqa,mqa,mla,lrkv] [--out reports/compare]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANT_NAMES = "mha,gqa,mqa,mla,lrkv"  # eval.common.VARIANTS, for the parser (built before torch loads)


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=VARIANT_NAMES,
                   help="comma-separated attention variants, the first one's tokenizer shared (default %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per LM run (16 x 128 tokens each)")
    p.add_argument("--mqar-steps", type=int, default=600, help="token-pair recall study: training steps (0 skips it)")
    p.add_argument("--val-every", type=int, default=25, help="LM runs: optimizer steps between validations")
    p.add_argument("--smooth", type=int, default=2, help="validation points in the trailing mean")
    p.add_argument("--mqar-pairs", type=int, default=32, help="key-value pairs (one token each) per recall sequence")
    p.add_argument("--mqar-queries", type=int, default=16, help="keys asked per recall sequence (<= pairs)")
    p.add_argument("--mqar-keys", type=int, default=64, help="distinct keys (pairs draw distinct ones)")
    p.add_argument("--mqar-values", type=int, default=28, help="distinct values a key can hold")
    p.add_argument("--mqar-seeds", type=int, default=3, help="recall trainings per variant (mean, min, max reported)")
    p.add_argument("--mqar-eval", type=int, default=512, help="held-out sequences scored")
    p.add_argument("--mqar-eval-every", type=int, default=100, help="recall steps between held-out scores")
    p.add_argument("--mqar-lrqk-rank", type=int, default=8, help="LRQK rank when the queries decode through LRQK")
    p.add_argument("--mqar-lrqk-top-k", type=int, default=8, help="of the ~pairs + queries keys before each query")
    p.add_argument("--out", default="reports/compare", help="report folder: compare.md, runs/, plots (default "
                                                             "%(default)s); finished runs there are reused")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

from eval import head_diversity  # noqa: E402
from eval.common import VARIANTS, cli, markdown_table, plt, save_figure, scatter_variants  # noqa: E402
from eval.recall_study import MQARTask, mqar_study  # noqa: E402
from lrkv.export import WEIGHTS_NAME, load_export  # noqa: E402
from lrkv.inference.sparse import SparseConfig  # noqa: E402
from lrkv.rundir import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "mha"


# ---------------------------------------------------------------------------------------------------- training runs


def train(variant: str, run_dir: Path, steps: int, val_every: int, extra: list[str]) -> None:
    """One train.py subprocess (log in run_dir/train.log); skipped when run_dir already holds an export."""
    if (RunDir(run_dir).export / WEIGHTS_NAME).is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "lrkv_debug.yaml", *VARIANTS[variant],
           f"--run.dir={run_dir}", f"--train.max_steps={steps}", f"--train.val_every={val_every}",
           f"--train.ckpt_every={steps}", f"--train.warmup_steps={min(20, steps // 10)}", "--train.val_batches=4",
           "--log.tensorboard=false", "--log.progress_bar=false", "--run.sample_tokens=8", *extra]
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: train.py failed ({done.returncode}); see {run_dir / 'train.log'}")
    print(f"trained {variant} in {time.time() - t0:.0f} s -> {run_dir}", flush=True)


def train_all(variants: list[str], root: Path, steps: int, val_every: int, extra: list[str]) -> dict[str, Path]:
    """Train every variant; all after the first reuse the first run's tokenizer and packed data."""
    runs = {v: root / v for v in variants}
    first = RunDir(runs[variants[0]])
    for v, run_dir in runs.items():
        shared, run = [], RunDir(run_dir)
        if run != first:
            shared = [f"--data.tokenizer={first.tokenizer}"]
            if not run.data.exists():  # lrkv.data reuses a packed cache made with the same tokenizer
                shutil.copytree(first.data, run.data)
                shutil.copy(first.tokenizer, run.tokenizer)
        train(v, run_dir, steps, val_every, extra + shared)
    return runs


def run_metrics(run_dir: Path) -> dict:
    """The metrics.json train.py wrote for a run (callbacks.RunMetrics)."""
    return json.loads(RunDir(run_dir).metrics.read_text())


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(optimizer steps done, validation loss) of a run."""
    return [(int(step), float(loss)) for step, loss in run_metrics(run_dir)["val_loss"]]


def step_cost(run_dir: Path) -> tuple[int, float]:
    """(tokens, training FLOPs) per optimizer step of a run."""
    m = run_metrics(run_dir)
    return m["tokens_per_step"], float(m["flops_per_step"])


# ---------------------------------------------------------------------------------------------------- savings


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where the loss curve reaches target, linearly interpolated between points; None if never."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def savings(base: list[tuple[int, float]], base_flops_per_step: float, curve: list[tuple[int, float]],
            flops_per_step_: float) -> dict:
    """docs/lrkv.md §6 step- and FLOP-based savings of `curve` against the baseline's final (smoothed) loss."""
    target, total_steps = base[-1][1], base[-1][0]
    s_star = steps_to_reach(curve, target)
    if s_star is None:
        return {"s*": "not reached", "step saving %": "", "FLOP saving %": ""}
    return {"s*": round(s_star, 1), "step saving %": 100.0 * (1 - s_star / total_steps),
            "FLOP saving %": 100.0 * (1 - s_star * flops_per_step_ / (total_steps * base_flops_per_step))}


def lm_rows(runs: dict[str, Path], smooth_window: int) -> tuple[list[dict], dict]:
    curves, flops, tokens, rows = {}, {}, {}, []
    for v, run_dir in runs.items():
        raw = val_curve(run_dir)
        curves[v] = list(zip([s for s, _ in raw], smooth([l for _, l in raw], smooth_window)))
        tokens[v], flops[v] = step_cost(run_dir)
    base = BASELINE if BASELINE in runs else next(iter(runs))
    kv_base = load_export(RunDir(runs[base]).export).kv_bytes_per_token()
    for v, run_dir in runs.items():
        model = load_export(RunDir(run_dir).export)
        steps, final = curves[v][-1]
        rows.append({"variant": v, "params": model.num_params(), "KV B/token": model.kv_bytes_per_token(),
                     "KV % MHA": 100.0 * model.kv_bytes_per_token() / kv_base,
                     "train GFLOPs": steps * flops[v] / 1e9, "tokens": steps * tokens[v],
                     "final val loss": final, "Δ vs MHA": final - curves[base][-1][1],
                     **savings(curves[base], flops[base], curves[v], flops[v])})
    return rows, {"curves": curves, "flops": flops}


def plot_lm(rows: list[dict], data: dict, out: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for v, curve in data["curves"].items():
        a.plot([s * data["flops"][v] for s, _ in curve], [l for _, l in curve], marker=".", label=v)
    a.set_xlabel("cumulative training FLOPs")
    a.set_ylabel("validation loss (smoothed)")
    a.legend()
    scatter_variants(b, rows, "final val loss", "final validation loss")
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    out, variants = Path(args.out), args.variants.split(",")
    t0 = time.time()

    runs = train_all(variants, out / "runs", args.steps, args.val_every, [])
    rows, data = lm_rows(runs, args.smooth)
    plot_lm(rows, data, out / "loss_vs_flops_and_kv.png")
    report = [f"# Small replication (debug size, {args.steps} steps x 2048 tokens per variant, embedded corpus)\n",
              markdown_table(rows), "\n![loss](loss_vs_flops_and_kv.png)\n",
              "\n## Head diversity of the trained models (docs/lrkv.md §7)\n",
              head_diversity.run([str(RunDir(runs[v]).export) for v in variants], variants, out / "head_diversity"),
              "\n![head diversity](head_diversity/head_diversity.png)\n"]

    if args.mqar_steps > 0:
        task = MQARTask(args.mqar_keys, args.mqar_values, args.mqar_pairs, args.mqar_queries)
        lrqk = SparseConfig(top_k=args.mqar_lrqk_top_k, recent=1,
                            sparse_query_tail=task.queries).tuned(rank=args.mqar_lrqk_rank)
        mq_rows = mqar_study(variants, task, args.mqar_steps, args.mqar_seeds, args.mqar_eval_every,
                             args.mqar_eval, lrqk, out / "mqar.png")
        report += [f"\n## Token-pair recall (MQAR-style, one token per pair: {task.pairs} pairs of {task.keys} keys x "
                   f"{task.values} values, {task.queries} queries; {args.mqar_steps} steps x 64 sequences; "
                   f"accuracy on {args.mqar_eval} held-out sequences; mean/min/max of {args.mqar_seeds} seeds; LRQK: "
                   f"the queries decoded with rank {lrqk.knobs.rank}, top-{lrqk.top_k} + the current token)\n",
                   markdown_table(mq_rows), "\n![mqar](mqar.png)\n"]
    report.append(f"\nwall time {time.time() - t0:.0f} s\n")
    text = "".join(report)
    (out / "compare.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    cli(main)
