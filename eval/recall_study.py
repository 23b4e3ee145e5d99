"""Token-pair recall, the second study of `python -m eval compare`: an MQAR-style associative-recall task trained
from scratch.

Not the `mqar` task of eval/long_context.py, which writes key=value pairs as text into a prompt and asks a trained
export to retrieve one (long-context retrieval). Here each key-value pair is a single token (MQARTask below):
the debug-size variants are trained on fresh synthetic sequences for the same steps and seeds, and scored on
held-out ones, directly and with the queries decoded through the LRQK decoder.

Zoology's MQAR writes a pair as two tokens `k v`; recalling v then needs an induction circuit (a previous-token
head feeding a matching head). The debug model does not form one on a CPU budget: with two-token pairs and 8
queries of 8 pairs it stayed at the accuracy of guessing among the not-yet-asked values (34%, 2000 steps; 2 layers:
35% after 6000). Here a pair is one token, so one attention hop must find the pair whose key matches the query
and read its value: the study measures what the K and V projections keep, not when a circuit forms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.common import VARIANTS, plt, save_figure, scatter_variants
from lrkv.config import load_config
from lrkv.inference.sparse import SparseConfig, SparseDecoder
from lrkv.model import Transformer
from lrkv.optim import make_optimizer, make_schedule


@dataclass
class MQARTask:
    """Token ids: 1..keys*values are the pairs (k, v) -> 1 + k*values + v, then one query id per key, then one
    answer id per value. A sequence is `pairs` pair tokens with distinct keys, then `queries` of those keys; the
    target at each query is its pair's value. No answer is ever an input, so accuracy needs no teacher forcing."""

    keys: int = 64
    values: int = 28
    pairs: int = 32
    queries: int = 16

    @property
    def vocab_needed(self) -> int:
        return 1 + self.keys * self.values + self.keys + self.values

    def check(self, vocab_size: int) -> None:
        if not self.queries <= self.pairs <= self.keys:
            raise ValueError(f"MQAR needs queries <= pairs <= keys, got {self.queries}, {self.pairs}, {self.keys}")
        if self.vocab_needed > vocab_size:
            raise ValueError(f"MQAR with {self.keys} keys x {self.values} values needs {self.vocab_needed} token ids; "
                             f"the model has {vocab_size}")

    def batch(self, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (size, pairs + queries); targets are -100 except at the queries."""
        keys = torch.stack([torch.randperm(self.keys, generator=g)[:self.pairs] for _ in range(size)])
        values = torch.randint(0, self.values, (size, self.pairs), generator=g)
        asked = torch.stack([torch.randperm(self.pairs, generator=g)[:self.queries] for _ in range(size)])
        query_base = 1 + self.keys * self.values
        x = torch.cat([1 + keys * self.values + values, query_base + keys.gather(1, asked)], 1)
        targets = torch.full_like(x, -100)
        targets[:, self.pairs:] = query_base + self.keys + values.gather(1, asked)
        return x, targets


def mqar_accuracy(model, task: MQARTask, n_sequences: int, seed: int) -> float:
    """Share of held-out queries whose argmax is the right value; `model` maps ids (B, T) to logits (B, T, V)."""
    x, targets = task.batch(torch.Generator().manual_seed(seed), n_sequences)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    asked = targets != -100
    return (pred[asked] == targets[asked]).float().mean().item()


def train_mqar(variant: str, task: MQARTask, steps: int, seed: int, eval_every: int, n_eval: int,
               batch_size: int = 64, lr: float = 1e-3) -> tuple[Transformer, list[tuple[int, float]]]:
    """Train the debug-size `variant` on fresh token-pair batches with train.py's optimizer and schedule
    (lrkv/optim.py; cosine here); returns the model and (steps done, held-out accuracy) every eval_every steps and
    at the end."""
    cfg = load_config("lrkv_debug.yaml", [*VARIANTS[variant], f"--train.lr={lr}", f"--train.max_steps={steps}",
                                          "--train.schedule=cosine", f"--train.warmup_steps={min(50, steps // 10)}"])
    task.check(cfg.model.vocab_size)
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    sched = make_schedule(opt, cfg.train)
    g, curve = torch.Generator().manual_seed(seed), []
    for step in range(1, steps + 1):
        x, targets = task.batch(g, batch_size)
        loss = model(x, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, mqar_accuracy(model.eval(), task, n_eval, seed=10_000)))
            model.train()
    return model.eval(), curve


def mqar_study(variants: list[str], task: MQARTask, steps: int, seeds: int, eval_every: int, n_eval: int,
               lrqk: SparseConfig, out: Path) -> list[dict]:
    """Every variant x seed; one row per variant (final accuracy: mean, min, max over seeds; the same held-out
    queries answered through the LRQK decoder, whose proxy must pick the matching pair); plots accuracy against
    training step and against KV bytes to `out`."""
    rows, curves = [], {}
    for v in variants:
        t0 = time.time()
        runs = [train_mqar(v, task, steps, seed, eval_every, n_eval) for seed in range(seeds)]
        curves[v] = [(s, sum(c[i][1] for _, c in runs) / seeds) for i, (s, _) in enumerate(runs[0][1])]
        final = [100.0 * c[-1][1] for _, c in runs]
        row = {"variant": v, "KV B/token": runs[0][0].kv_bytes_per_token(), "MQAR acc %": sum(final) / seeds,
               "min %": min(final), "max %": max(final), "LRQK acc %": "n/a (MLA)"}
        if v != "mla":  # LRQK's proxy covers lrkv, mha, gqa and mqa
            row["LRQK acc %"] = sum(100.0 * mqar_accuracy(SparseDecoder(m, lrqk).prefill, task, n_eval, seed=10_000)
                                    for m, _ in runs) / seeds
        rows.append(row)
        print(f"token-pair recall {v}: {', '.join(f'{a:.1f}' for a in final)} %, LRQK {row['LRQK acc %']} "
              f"({time.time() - t0:.0f} s)", flush=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for v, curve in curves.items():
        a.plot([s for s, _ in curve], [100.0 * acc for _, acc in curve], marker=".", label=v)
    a.set_xlabel("training step")
    a.set_ylabel(f"held-out accuracy (%), mean of {seeds} seeds")
    a.legend()
    scatter_variants(b, rows, "MQAR acc %", "final token-pair recall accuracy (%), mean and seed range")
    for r in rows:  # each variant's seed range
        kv, acc = r["KV B/token"], r["MQAR acc %"]
        b.errorbar(kv, acc, yerr=[[acc - r["min %"]], [r["max %"] - acc]], fmt="none", ecolor="grey", capsize=3)
    save_figure(fig, out)
    return rows
