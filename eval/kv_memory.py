"""KV-cache bytes per token, and per sequence at 4K..128K, for every shipped config and every debug-scale variant:
measured from real cache tensors and checked against the formula (`Transformer.kv_bytes_per_token`).

A cache's layout depends only on one layer's attention geometry, so the measurement runs a real bf16 forward
through a copy of the model with one layer (same d_model, heads, head_dim, ranks, MLA latents; a 16-token vocab
and a 16-wide MLP) and multiplies the bytes its KVCache holds per token by n_layer. A 2.5B config thus costs
one attention layer of memory, not the model.

It also prints the LRQK decoder's GPU plan (lrkv.inference.lrqk.memory_plan, bf16, batch 1, the paper preset:
rank 32, top-k 2048, recent 64) for GQA models the paper evaluates, per query head (the reference) and
group-shared (one proxy and slot set per KV head), against their full bf16 KV cache.

    python -m eval.kv_memory [--out reports/kv_memory]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m eval.kv_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/kv_memory",
                   help="folder for kv_memory.md and kv_memory.png (default %(default)s)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402

from eval.common import VARIANTS, cli, markdown_table, plt, save_figure  # noqa: E402
from lrkv.config import CONFIG_DIR, ModelConfig, load_config  # noqa: E402
from lrkv.inference.sparse import SparseConfig, memory_plan  # noqa: E402
from lrkv.info import mha_equivalent  # noqa: E402
from lrkv.model import Transformer  # noqa: E402

CONTEXTS = (4096, 8192, 32768, 131072)
ATTN_ORDER = ("mha", "gqa", "mqa", "mla", "lrkv")
DTYPE, DTYPE_BYTES = torch.bfloat16, 2


def measured_bytes_per_token(m: ModelConfig) -> int:
    """Bytes per token (all layers, bf16) of the tensors a real forward leaves in the cache."""
    probe = dataclasses.replace(m, n_layer=1, vocab_size=16, ffn_dim=16, attn_impl="torch")
    model = Transformer(probe).to(DTYPE).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    return m.n_layer * cache.layers[0].bytes_per_token()


def formula_bytes_per_token(m: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(m).kv_bytes_per_token(DTYPE_BYTES)


def named_configs() -> list[tuple[str, ModelConfig]]:
    """Every configs/*.yaml, plus lrkv_debug turned into each variant (the geometry eval.compare trains)."""
    out = [(p.stem, load_config(p).model) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    out += [(f"debug-{name}", load_config("lrkv_debug.yaml", overrides).model) for name, overrides in VARIANTS.items()]
    return out


def kv_rows(configs: list[tuple[str, ModelConfig]] | None = None) -> list[dict]:
    rows = []
    for name, m in configs or named_configs():
        measured, formula = measured_bytes_per_token(m), formula_bytes_per_token(m)
        mha = formula_bytes_per_token(mha_equivalent(m))
        row = {"config": name, "attn": m.attn, "layers": m.n_layer, "bytes/token": measured, "formula": formula,
               "match": measured == formula, "% of MHA": 100.0 * measured / mha,
               # caching the layer input instead (docs/lrkv.md §2, the x-cache bound)
               "x-cache bound %": 100.0 * m.d_model / (2 * m.n_head * m.dh)}
        row.update({f"GiB@{t // 1024}K": measured * t / 2**30 for t in CONTEXTS})
        rows.append(row)
    return rows


# Published geometries (config.json of each model): layers, d_model, query heads, KV heads, head_dim, FFN, vocab
GQA_MODELS = {"Qwen2.5-7B": (28, 3584, 28, 4, 128, 18944, 152064), "Llama-3-8B": (32, 4096, 32, 8, 128, 14336, 128256),
              "SmolLM2-135M": (30, 576, 9, 3, 64, 1536, 49152)}


def lrqk_plan_rows(contexts=(32768, 131072)) -> list[dict]:
    """GPU bytes of the LRQK decoder (paper preset, bf16, batch 1) per query head and group-shared vs full KV."""
    rows = []
    for name, (L, d, H, G, D, ffn, vocab) in GQA_MODELS.items():
        m = ModelConfig(attn="gqa", n_layer=L, d_model=d, n_head=H, n_kv_head=G, head_dim=D, ffn_dim=ffn,
                        vocab_size=vocab, max_seq_len=max(contexts))
        for ctx in contexts:
            full = ctx * L * G * 2 * D * 2
            for proxy in ("shared", "group"):
                plan = memory_plan(m, SparseConfig.preset("paper", proxy=proxy), 1, ctx, torch.bfloat16)
                rows.append({"model": name, "context": f"{ctx // 1024}K",
                             "LRQK proxy": "per query head" if proxy == "shared" else "group (per KV head)",
                             "GPU GiB": plan.gpu_bytes / 2**30, "of which A_K GiB": plan.detail["policy"] / 2**30,
                             "full bf16 KV GiB": full / 2**30, "GPU / full": plan.gpu_bytes / full,
                             "CPU store GiB": plan.cpu_bytes / 2**30})
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.28 * len(rows) + 2.5))
    names = [r["config"] for r in rows]
    colors = [f"C{ATTN_ORDER.index(r['attn'])}" for r in rows]  # one colour per variant in both panels
    left.barh(names, [r["% of MHA"] for r in rows], color=colors)
    left.scatter([r["x-cache bound %"] for r in rows], names, marker="|", s=120, color="k", label="cache layer input x")
    left.set_xlabel("KV bytes per token, % of the same body with MHA")
    left.invert_yaxis()
    left.legend(loc="lower right")
    for r, color in zip(rows, colors):
        style = "-" if "2p5b" in r["config"] else "--" if "125m" in r["config"] else ":"
        right.plot(CONTEXTS, [r[f"GiB@{t // 1024}K"] for t in CONTEXTS], style, color=color, marker="o", label=r["config"])
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("context (tokens)")
    right.set_ylabel("KV cache per sequence (GiB, bf16)")
    right.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    rows = kv_rows()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    plan = markdown_table(lrqk_plan_rows())
    (out / "kv_memory.md").write_text("# KV cache per token (bf16), measured vs formula\n\n" + table
                                      + "\n## LRQK decoder GPU plan (paper preset, bf16, batch 1)\n\n" + plan)
    plot(rows, out / "kv_memory.png")
    print(table + "\n" + plan)
    bad = [r["config"] for r in rows if not r["match"]]
    if bad:
        raise SystemExit(f"measured KV bytes differ from the formula for {bad}")
    return rows


if __name__ == "__main__":
    cli(main)
