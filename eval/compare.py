"""The small replication: MHA, GQA, MQA, MLA and LRKV at the debug size, same token budget, same data.

Language modelling: `train.py --config lrkv_debug.yaml` once per variant (eval.common.VARIANTS) on the embedded
corpus; the first run trains the tokenizer and the others reuse it, so every variant sees the same tokens and
the same validation batches. Reported: validation loss against cumulative training FLOPs (steps x tokens/step x
`num_flops_per_token`) and against KV bytes per token, and spec lrkv.md §6's savings: the target is MHA's
final (smoothed) validation loss; s* is the first step (linear interpolation between validation points) where a
variant's smoothed loss reaches it; step saving = 1 - s*/S_mha, FLOP saving = 1 - C_variant(s*)/C_mha(S_mha).
The trained exports also go through the head-diversity analysis (eval.head_diversity).

Associative recall: the same variants trained on MQAR text (eval.long_context.gen_mqar documents, written to
a .jsonl) and scored by teacher-forced exact-match accuracy on the open query of held-out items.

    python -m eval.compare [--steps 150] [--mqar-steps 150] [--variants mha,gqa,mqa,mla,lrkv] [--out reports/compare]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from eval import head_diversity
from eval.common import VARIANTS, export_tokenizer, markdown_table, plt, save_figure
from eval.long_context import Item, encode, gen_mqar
from lrkv.config import load_config
from lrkv.export import load_export
from lrkv.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "mha"


# ---------------------------------------------------------------------------------------------------- training runs


def train(variant: str, run_dir: Path, steps: int, val_every: int, extra: list[str]) -> None:
    """One train.py subprocess (log in run_dir/train.log); skipped when run_dir already holds an export."""
    if (run_dir / "export" / "model.safetensors").is_file():
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
    first = runs[variants[0]]
    for v, run_dir in runs.items():
        shared = []
        if run_dir != first:
            shared = [f"--data.tokenizer={first / 'tokenizer.json'}"]
            if not (run_dir / "data").exists():  # lrkv.data reuses a packed cache made with the same tokenizer
                shutil.copytree(first / "data", run_dir / "data")
                shutil.copy(first / "tokenizer.json", run_dir / "tokenizer.json")
        train(v, run_dir, steps, val_every, extra + shared)
    return runs


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(optimizer steps done, validation loss) from the newest CSV log of a run."""
    metrics = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))[-1]
    with open(metrics) as f:
        # Lightning logs the step index of the batch just finished, i.e. steps done - 1
        return [(int(r["step"]) + 1, float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]


def step_cost(run_dir: Path) -> tuple[int, float]:
    """(tokens, training FLOPs) per optimizer step of a run, from its resolved config."""
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        per_token = Transformer(cfg.model).num_flops_per_token(cfg.data.seq_len)
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum
    return tokens, float(per_token * tokens)


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
    """Spec §6 step- and FLOP-based savings of `curve` against the baseline's final (smoothed) loss."""
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
    kv_base = load_export(runs[base] / "export").kv_bytes_per_token()
    for v, run_dir in runs.items():
        model = load_export(run_dir / "export")
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


def scatter_variants(ax, rows: list[dict], y: str, ylabel: str) -> None:
    """One labelled point per variant: KV bytes per token against the column `y`."""
    for r in rows:
        ax.scatter(r["KV B/token"], r[y])
        ax.annotate(r["variant"], (r["KV B/token"], r[y]))
    ax.set_xlabel("KV cache bytes per token (bf16, all layers)")
    ax.set_ylabel(ylabel)


# ---------------------------------------------------------------------------------------------------- MQAR


def mqar_item(rng: random.Random, max_pairs: int, queries: int) -> Item:
    """Two-letter keys and two-digit values: about one token each, so a small model can learn the lookup quickly."""
    return gen_mqar(rng, rng.randint(queries + 2, max_pairs), rng.random(), queries, key_len=2, value_digits=2)


def write_mqar_corpus(path: Path, n_docs: int, max_pairs: int, queries: int, seed: int) -> Path:
    """One document per MQAR item, answer included; the LM learns recall from the answered queries."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n_docs):
            it = mqar_item(rng, max_pairs, queries)
            f.write(json.dumps({"text": it.prompt + it.answers[0]}) + "\n")
    return path


def mqar_accuracy(export: Path, n_items: int, max_pairs: int, queries: int, seed: int) -> float:
    """Share of held-out items whose open-query answer tokens are all the model's argmax (teacher forced)."""
    model, tok = load_export(export), export_tokenizer(export)
    rng, correct = random.Random(seed), 0
    with torch.no_grad():
        for _ in range(n_items):
            it = mqar_item(rng, max_pairs, queries)
            prompt, answer = encode(tok, it.context) + encode(tok, it.question), encode(tok, it.answers[0])
            logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1]
            correct += bool((logits.argmax(-1) == torch.tensor(answer)).all())
    return 100.0 * correct / n_items


def plot_mqar(rows: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    scatter_variants(ax, rows, "MQAR acc %", "MQAR exact-match accuracy (%)")
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per LM run (16 x 128 tokens each)")
    ap.add_argument("--mqar-steps", type=int, default=150, help="0 skips the associative-recall study")
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--smooth", type=int, default=2, help="validation points in the trailing mean")
    ap.add_argument("--mqar-pairs", type=int, default=16, help="most key=value pairs per MQAR document")
    ap.add_argument("--mqar-queries", type=int, default=8)
    ap.add_argument("--mqar-eval", type=int, default=200)
    ap.add_argument("--out", default="reports/compare")
    args = ap.parse_args(argv)
    out, variants = Path(args.out), args.variants.split(",")
    t0 = time.time()

    runs = train_all(variants, out / "runs", args.steps, args.val_every, [])
    rows, data = lm_rows(runs, args.smooth)
    plot_lm(rows, data, out / "loss_vs_flops_and_kv.png")
    report = [f"# Small replication (debug size, {args.steps} steps x 2048 tokens per variant, embedded corpus)\n",
              markdown_table(rows), "\n![loss](loss_vs_flops_and_kv.png)\n",
              "\n## Head diversity of the trained models (spec §7)\n",
              head_diversity.run([str(runs[v] / "export") for v in variants], variants, out / "head_diversity"),
              "\n![head diversity](head_diversity/head_diversity.png)\n"]

    if args.mqar_steps > 0:
        corpus = write_mqar_corpus(out / "mqar" / "train.jsonl", 200 * args.mqar_steps, args.mqar_pairs,
                                   args.mqar_queries, seed=0)
        mq_runs = train_all(variants, out / "mqar" / "runs", args.mqar_steps, args.val_every, [f"--data.source={corpus}"])
        mq_rows = []
        for v, run_dir in mq_runs.items():
            model = load_export(run_dir / "export")
            mq_rows.append({"variant": v, "KV B/token": model.kv_bytes_per_token(),
                            "final val loss": val_curve(run_dir)[-1][1],
                            "MQAR acc %": mqar_accuracy(run_dir / "export", args.mqar_eval, args.mqar_pairs,
                                                        args.mqar_queries, seed=10_000)})
        plot_mqar(mq_rows, out / "mqar.png")
        report += [f"\n## Associative recall (MQAR text, {args.mqar_steps} steps; up to {args.mqar_pairs} pairs, "
                   f"{args.mqar_queries} queries; accuracy on {args.mqar_eval} held-out open queries)\n",
                   markdown_table(mq_rows), "\n![mqar](mqar.png)\n"]
    report.append(f"\nwall time {time.time() - t0:.0f} s\n")
    text = "".join(report)
    (out / "compare.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
