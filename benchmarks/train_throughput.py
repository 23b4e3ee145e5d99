"""Training throughput and MFU of a config's attention variant vs MHA at the same shape, in one run.

    python benchmarks/train_throughput.py [--config lrkv_debug.yaml] [--steps 20] [--warmup 5] [--section.key=value ...]

Times full optimizer steps (forward, backward, clip, AdamW) of train.py's model and optimizer (lrkv/optim.py) on
random tokens (speed does not depend on the data), bf16 autocast on CUDA and fp32 on CPU. The first `--warmup`
steps (allocator, autotuning) are not timed; tokens/s comes from the median step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from lrkv.config import Config, ConfigError, parse_cli  # noqa: E402

USAGE = "python benchmarks/train_throughput.py [--config FILE] [--steps N] [--warmup N] [--section.key=value ...]"
OPTIONS = ("  --config FILE   default lrkv_debug.yaml\n"
           "  --steps N       timed optimizer steps (default 20)\n"
           "  --warmup N      untimed steps first: allocator, autotuning (default 5)")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """(the benchmark's options, the validated config); --help lists both, with every config field."""
    p = argparse.ArgumentParser(add_help=False)  # --help goes on to parse_cli, which prints the config fields too
    p.add_argument("--config", default="lrkv_debug.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args, overrides = p.parse_known_args(argv)
    return args, parse_cli(["--config", args.config, *overrides], USAGE, __doc__.split("\n\n")[0], OPTIONS)


if __name__ == "__main__":  # --help and config errors are answered here, before torch and Lightning load
    try:
        parse_args(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")

import torch  # noqa: E402

from lrkv.callbacks import peak_flops  # noqa: E402
from lrkv.model import Transformer  # noqa: E402
from lrkv.optim import make_optimizer  # noqa: E402


def make_step(cfg: Config, device: torch.device):
    """A closure running one optimizer step of the training setup on a fixed random batch, and its model."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing  # as LitLM.configure_model sets it
    opt = make_optimizer(model, cfg.train, device)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        t0 = time.perf_counter()
        with autocast:
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, model


def summarize(cfg: Config, model, times: list[float], device: torch.device) -> dict:
    seconds = statistics.median(times)  # robust to other jobs sharing the machine
    tps = cfg.train.micro_batch_size * cfg.data.seq_len / seconds
    peak = peak_flops(device)
    return {"attn": cfg.model.attn, "params": model.num_params(), "tokens_per_s": tps, "step_ms": 1000 * seconds,
            "mfu": model.num_flops_per_token(cfg.data.seq_len) * tps / peak if peak else None}


def measure(cfgs: list[Config], steps: int, warmup: int, device: torch.device) -> list[dict]:
    if device.type == "cuda":  # one model at a time: a 2.5B model with its AdamW state fills most of a GPU
        rows = []
        for cfg in cfgs:
            step, model = make_step(cfg, device)
            rows.append(summarize(cfg, model, [step() for _ in range(warmup + steps)][warmup:], device))
            del step, model
            torch.cuda.empty_cache()
        return rows
    # shared CPUs: alternate the variants step by step so both see the same background load
    runners = [make_step(cfg, device) for cfg in cfgs]
    times: list[list[float]] = [[] for _ in cfgs]
    for i in range(warmup + steps):
        for j, (step, _) in enumerate(runners):
            dt = step()
            if i >= warmup:
                times[j].append(dt)
    return [summarize(cfg, model, t, device) for cfg, (_, model), t in zip(cfgs, runners, times)]


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mha = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn="mha", n_kv_head=None))
    rows = measure([cfg, mha], args.steps, args.warmup, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.config}: micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}, {name}, "
          f"median of {args.steps} timed steps after {args.warmup} warmup")
    print(f"{'attn':<6} {'params':>12} {'tokens/s':>12} {'step ms':>9} {'MFU':>7}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['attn']:<6} {r['params']:>12,} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {mfu:>7}")
    print(f"{rows[0]['attn']}/mha tokens/s ratio: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
