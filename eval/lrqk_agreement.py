"""LRQK vs full attention, per layer and end to end, swept over rank r and top-k.

For each prompt (a window of held-out text) the full decoder and the LRQK decoder prefill the same prefix and
are then teacher-forced through the same continuation, so every step compares like with like:
    recall      share of the exact top-k keys (by true q.k, among top-k candidates) that the proxy selected
                (the decoder's own `measure_recall`), mean over steps, per layer
    mass        softmax attention mass of the exact scores that falls on the attended set (sinks + recent + top-k)
    rel_err     ||y_lrqk - y_exact|| / ||y_exact|| of the layer's attention output, where y_exact is exact
                attention over every stored token for the same query: each layer's own error, not propagated
    kl          KL(p_full || p_lrqk) of the final next-token distributions
    agree       share of steps whose greedy (argmax) token is the same
The per-layer numbers come from the decoder's probe (SparseDecoder.probe: per layer and step, the attended set and
every stored key and value).

    python -m eval.lrqk_agreement --export DIR [--ranks 4,8,16] [--top-ks 16,32,64] [--prompts 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from lrkv.inference.sparse.config import SparseConfig, add_sparse_args, sparse_config


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m eval.lrqk_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="export folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--source", default="shakespeare",
                   help="text the prompts are cut from: shakespeare | local file/folder | hf:NAME[:CONFIG]")
    p.add_argument("--split", default="val", choices=("val", "all"),
                   help="val: the documents training held out (default); all: every document")
    p.add_argument("--prompts", type=int, default=4, help="text windows, one prompt each (default %(default)s)")
    p.add_argument("--prefix", type=int, default=192, help="prefilled tokens per prompt (default %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="teacher-forced decode steps per prompt (default %(default)s)")
    add_sparse_args(p, {"rank": "4,8,16", "top_k": "16,32,64", "recent": 16, "sinks": 4}, sweep=("rank", "top_k"))
    p.add_argument("--threads", type=int, default=1, help="torch threads; decode steps are too small for more")
    p.add_argument("--out", default="reports/lrqk_agreement",
                   help="folder for lrqk_agreement.md and .png (default %(default)s)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eval.common import cli, markdown_table, plt, save_figure  # noqa: E402
from eval.perplexity import source_tokens  # noqa: E402
from lrkv.export import load_export, open_export  # noqa: E402
from lrkv.inference.full import FullDecoder  # noqa: E402
from lrkv.inference.sparse import DecodeStep, SparseDecoder  # noqa: E402
from lrkv.model import Transformer  # noqa: E402


class Probe:
    """SparseDecoder.probe: at every decode step of every layer, the share of exact attention's mass on the attended
    set and the relative error of the layer's attention output against exact attention over all stored tokens."""

    def __init__(self, n_layer: int):
        self.mass, self.rel_err = [[] for _ in range(n_layer)], [[] for _ in range(n_layer)]

    def __call__(self, step: DecodeStep) -> None:
        D = step.q.shape[-1]
        p = torch.softmax((step.q.float() @ step.keys.float().mT)[:, :, 0] / math.sqrt(D), dim=-1)  # (B, H, L)
        exact = p[:, :, None] @ step.values.float()  # (B, H, 1, D)
        self.mass[step.layer].append(float((p * step.attended).sum(-1).mean()))
        self.rel_err[step.layer].append(float((step.y.float() - exact).norm() / exact.norm().clamp_min(1e-30)))


def agreement(model: Transformer, windows: list[torch.Tensor], prefix: int, cfg: SparseConfig) -> dict:
    """Metrics for one LRQK config over teacher-forced windows (each prefix + continuation tokens)."""
    cfg = dataclasses.replace(cfg, measure_recall=True)
    n_layer = len(model.layers)
    mass, rel_err, recall = [[] for _ in range(n_layer)], [[] for _ in range(n_layer)], []
    kl, agree = [], []
    for w in windows:
        full, lrqk = FullDecoder(model), SparseDecoder(model, cfg)
        lf, ll = full.prefill(w[None, :prefix])[:, -1], lrqk.prefill(w[None, :prefix])[:, -1]
        lrqk.probe = probe = Probe(n_layer)
        for t in range(prefix, len(w)):
            tok = w[None, t:t + 1]
            lf, ll = full.step(tok)[:, -1], lrqk.step(tok)[:, -1]
            logp_f, logp_l = F.log_softmax(lf.float(), -1), F.log_softmax(ll.float(), -1)
            kl.append(float((logp_f.exp() * (logp_f - logp_l)).sum()))
            agree.append(float(lf.argmax() == ll.argmax()))
        for i in range(n_layer):
            mass[i] += probe.mass[i]
            rel_err[i] += probe.rel_err[i]
        recall.append(lrqk.stats.recall)
    per_layer = {"recall": np.mean(recall, axis=0).tolist(), "mass": [float(np.mean(m)) for m in mass],
                 "rel_err": [float(np.mean(e)) for e in rel_err]}
    return {**{k: float(np.mean(v)) for k, v in per_layer.items()}, "kl": float(np.mean(kl)),
            "agree": float(np.mean(agree)), "per_layer": per_layer}


def sweep(model: Transformer, windows: list[torch.Tensor], prefix: int, base: SparseConfig, ranks: list[int],
          top_ks: list[int]) -> list[dict]:
    """One row per (rank, top_k) of `base`."""
    rows = []
    for r in ranks:
        for k in top_ks:
            res = agreement(model, windows, prefix, dataclasses.replace(base, top_k=k).tuned(rank=r))
            row = {"rank": r, "top_k": k, **{m: res[m] for m in ("recall", "mass", "rel_err", "kl", "agree")}}
            row |= {f"{m} by layer": " ".join(f"{x:.3f}" for x in res["per_layer"][m]) for m in res["per_layer"]}
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path, prefix: int) -> Path:
    metrics = ("recall", "mass", "rel_err", "kl", "agree")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.3))
    for ax, m in zip(axes, metrics):
        for r in sorted({row["rank"] for row in rows}):
            pts = [(row["top_k"], row[m]) for row in rows if row["rank"] == r]
            ax.plot(*zip(*pts), marker="o", label=f"r={r}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"top-k (of {prefix} prompt tokens)")
        ax.set_title(m)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def text_windows(export: str, n: int, length: int, source: str, split: str) -> list[torch.Tensor]:
    tokens = source_tokens(open_export(export).tokenizer, source, split)
    if len(tokens) < n * length:
        raise ValueError(f"{source} ({split}) has {len(tokens)} tokens, fewer than {n} windows of {length}")
    return [torch.from_numpy(tokens[i * length:(i + 1) * length].astype(np.int64)) for i in range(n)]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_export(args.export)
    windows = text_windows(args.export, args.prompts, args.prefix + args.steps, args.source, args.split)
    rows = sweep(model, windows, args.prefix, sparse_config(args), args.ranks, args.top_ks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "lrqk_agreement.md").write_text(
        f"# LRQK vs full ({args.export}; {args.prompts} prompts x {args.prefix} prefill + {args.steps} steps; "
        f"recent {args.recent}, sinks {args.sinks})\n\n{table}")
    plot(rows, out / "lrqk_agreement.png", args.prefix)
    print(table)
    return rows


if __name__ == "__main__":
    cli(main)
