"""Operator-space head diversity (docs/lrkv.md §7), for any export; compares variants.

Per layer and head h the gauge-invariant bilinear forms are M_h^QK = W_Q^h (W_K^h)^T and M_h^OV = W_V^h W_O^h
(d x d each, never formed). Their Gram matrix G_ab = <M_a, M_b>_F = tr((L_a^T L_b)(R_b^T R_a)) for M = L R^T
needs only d_h x d_h products. Optionally normalised to unit-norm operators, centred across heads
(G_c = J G J), eigen-decomposed in fp64; reported: top-k variance explained, effective rank (and as % of
its maximum H-1), participation ratio, and `spread` = tr(G_c)/tr(G), the share of operator energy that is
between-head variation. Attribution: QK with every head's key map replaced by the head mean (query-only)
and with the query map replaced by the head mean (key-only).

    python -m eval.head_diversity EXPORT [EXPORT ...] [--names a b ...] [--raw] [--out reports/head_diversity]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m eval.head_diversity", description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+", help="export folders to analyse and compare")
    p.add_argument("--names", nargs="*", help="a label per export (default: the run folder's or export's name)")
    p.add_argument("--raw", action="store_true", help="skip the unit-norm normalisation (scale then counts)")
    p.add_argument("--out", default="reports/head_diversity",
                   help="folder for head_diversity.md and .png (default %(default)s)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from eval.common import cli, markdown_table, plt, save_figure  # noqa: E402
from lrkv.export import load_export  # noqa: E402
from lrkv.model import Transformer  # noqa: E402
from lrkv.rundir import export_label  # noqa: E402

OPERATORS = ("qk", "ov", "qk_query_only", "qk_key_only")
TOP_K = (1, 2, 4)
ZERO_TOL = 1e-10  # eigenvalues below this share of tr(G) are fp64 round-off, i.e. exactly no diversity


@dataclass
class HeadMaps:
    """Per-head linear maps, each (H, d, d_h): M^QK_h = wq_h wk_h^T and M^OV_h = wv_h wo_h^T."""

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor  # W_O^h transposed: columns h*d_h..(h+1)*d_h of the output projection's (d, H d_h) weight


def head_maps(attn: torch.nn.Module) -> HeadMaps:
    """Effective per-head W_Q, W_K, W_V, W_O of one attention module (fp64), as the module reports them (its
    head_weights: query head h's K and V maps are those of the key/value head it reads)."""
    return HeadMaps(*attn.head_weights())


def operator_gram(left: Tensor, right: Tensor) -> Tensor:
    """G_ab = <L_a R_a^T, L_b R_b^T>_F from (H, d, m) factors, via (H, H, m, m) products only."""
    return (torch.einsum("adm,bdn->abmn", left, left) * torch.einsum("adm,bdn->abmn", right, right)).sum((-2, -1))


def centred_spectrum(gram: Tensor, normalize: bool) -> tuple[Tensor, float]:
    """Eigenvalues of J G J (descending, fp64) and tr(G) after the optional unit-norm scaling."""
    gram = gram.double()
    if normalize:
        inv = gram.diagonal().clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        gram = gram * inv[:, None] * inv[None, :]
    H = gram.shape[0]
    J = torch.eye(H, dtype=torch.float64) - 1.0 / H
    eig = torch.linalg.eigvalsh(J @ gram @ J).flip(0)
    total = float(gram.trace())
    return torch.where(eig > ZERO_TOL * total, eig, torch.zeros_like(eig)), total


def diversity_metrics(eig: Tensor, total: float) -> dict[str, float]:
    """Top-k variance explained, effective rank (absolute and % of H-1), participation ratio, spread."""
    H = eig.numel()
    s = float(eig.sum())
    if s <= 0.0:  # identical operators: no between-head variation at all
        return {"spread": 0.0, **{f"top{k}": 0.0 for k in TOP_K}, "erank": 0.0, "erank_pct": 0.0, "pr": 0.0}
    p = eig[eig > 0] / s
    erank = math.exp(-float((p * p.log()).sum()))
    out = {"spread": s / total, **{f"top{k}": float(eig[:k].sum()) / s for k in TOP_K}}
    return out | {"erank": erank, "erank_pct": 100.0 * erank / (H - 1), "pr": s * s / float((eig * eig).sum())}


@torch.no_grad()
def layer_diversity(attn: torch.nn.Module, normalize: bool = True) -> dict[str, dict[str, float]]:
    m = head_maps(attn)
    mean_q = m.wq.mean(0, keepdim=True).expand_as(m.wq)
    mean_k = m.wk.mean(0, keepdim=True).expand_as(m.wk)
    factors = {"qk": (m.wq, m.wk), "ov": (m.wv, m.wo), "qk_query_only": (m.wq, mean_k), "qk_key_only": (mean_q, m.wk)}
    return {op: diversity_metrics(*centred_spectrum(operator_gram(*factors[op]), normalize)) for op in OPERATORS}


def model_diversity(model: Transformer, normalize: bool = True) -> list[dict[str, dict[str, float]]]:
    """Per layer: operator -> metrics."""
    return [layer_diversity(layer.attn, normalize) for layer in model.layers]


def summary_rows(name: str, attn: str, per_layer: list[dict[str, dict[str, float]]]) -> list[dict]:
    """One row per operator: mean ± std over layers of each metric."""
    rows = []
    for op in OPERATORS:
        row = {"model": name, "attn": attn, "operator": op}
        for key in per_layer[0][op]:
            vals = torch.tensor([layer[op][key] for layer in per_layer], dtype=torch.float64)
            std = float(vals.std()) if len(vals) > 1 else 0.0
            row[key] = f"{float(vals.mean()):.3g} ± {std:.2g}"
        rows.append(row)
    return rows


def plot(results: dict[str, list[dict[str, dict[str, float]]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(OPERATORS), figsize=(4 * len(OPERATORS), 3.4), sharey=True)
    for ax, op in zip(axes, OPERATORS):
        for name, per_layer in results.items():
            ax.plot(range(len(per_layer)), [layer[op]["erank_pct"] for layer in per_layer], marker="o", label=name)
        ax.set_title(op)
        ax.set_xlabel("layer")
        ax.set_xticks(range(max(len(p) for p in results.values())))
    axes[0].set_ylabel("effective rank, % of H-1")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def run(exports: list[str], names: list[str] | None, out: Path, normalize: bool = True) -> str:
    names = names or [export_label(e) for e in exports]
    results, rows = {}, []
    for name, export in zip(names, exports):
        model = load_export(export, dtype=torch.float64)
        results[name] = model_diversity(model, normalize)
        rows += summary_rows(name, model.cfg.attn, results[name])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    norm = "unit-norm operators" if normalize else "raw operator scale"
    title = f"# Head diversity (docs/lrkv.md §7, centred Gram, {norm}; mean ± std over layers)"
    (out / "head_diversity.md").write_text(f"{title}\n\n{table}")
    plot(results, out / "head_diversity.png")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    print(run(args.exports, args.names, Path(args.out), normalize=not args.raw))


if __name__ == "__main__":
    cli(main)
