"""Helpers shared by the eval modules: the debug-scale variant overrides, tables, plotting."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CPU boxes or CI
import matplotlib.pyplot as plt  # noqa: E402

# CLI overrides that turn configs/lrkv_debug.yaml (4 heads, head_dim 32) into each baseline. GQA-2 matches LRKV's
# 50% cache; MLA keeps the framework defaults (d_c 64 + d_R 16 = 80 numbers, 31% of MHA).
VARIANTS: dict[str, list[str]] = {
    "mha": ["--model.attn=mha"],
    "gqa": ["--model.attn=gqa", "--model.n_kv_head=2"],
    "mqa": ["--model.attn=mqa"],
    "mla": ["--model.attn=mla"],
    "lrkv": ["--model.attn=lrkv"],
}


def cli(main) -> None:
    """Run an eval module's main() as a command: a bad export, tokenizer, setting or file is one `error:` line on
    stderr and exit code 2, not a traceback (every such error is a ValueError, MemoryError or missing file)."""
    import sys

    try:
        main()
    except (ValueError, MemoryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table; floats printed with 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter_variants(ax, rows: list[dict], y: str, ylabel: str) -> None:
    """One labelled point per variant: KV bytes per token against the column `y`."""
    for r in rows:
        ax.scatter(r["KV B/token"], r[y])
        ax.annotate(r["variant"], (r["KV B/token"], r[y]))
    ax.set_xlabel("KV cache bytes per token (bf16, all layers)")
    ax.set_ylabel(ylabel)
