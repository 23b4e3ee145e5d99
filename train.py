"""Pretrain an LRKV (or baseline) language model.

    python train.py --config lrkv_debug.yaml [--section.key=value ...]

Same command on a laptop (CPU, fp32) and on GPU nodes (torchrun / srun start one process per device;
Lightning picks the ranks up from the environment). The run folder (lrkv/rundir.py) gets: config.yaml (resolved),
tokenizer.json, data/ (tokenized corpus cache), checkpoints/ (step-N.ckpt, last.ckpt), csv/ and tensorboard/ logs,
metrics.json (loss curves, tokens, FLOPs, throughput), loss_curve.png, and export/ (config.json, model.safetensors,
tokenizer.json) at the end.

--run.resume=auto continues from the newest readable checkpoint of this run; the schedule (train.max_steps, lr
and its schedule fields, ckpt/val cadence) may change on resume and is logged in config_changes.log. A start
that is refused writes nothing; SIGTERM, SIGUSR1 and Ctrl-C save at the next optimizer-step boundary and stop.
"""

from __future__ import annotations

import importlib.util
import sys
import time

from lrkv.config import ConfigError, parse_cli

USAGE = "python train.py --config FILE [--section.key=value ...]"


def check_wandb(cfg) -> None:
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true: the wandb package is not installed (pip install 'lrkv[wandb]')")


if __name__ == "__main__":  # --help or a config typo is answered here, in well under a second, before ~10 s of imports
    if not sys.argv[1:]:  # no silent default run in runs/debug
        print(f"usage: {USAGE}\nerror: give --config FILE (e.g. --config lrkv_debug.yaml); --help lists every option",
              file=sys.stderr)
        sys.exit(2)
    try:
        check_wandb(parse_cli(sys.argv[1:], USAGE, __doc__.split("\n\n")[0]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lrkv.atomic import DiskFullError
from lrkv.callbacks import (LossCurve, NonFiniteLossError, NonFiniteLossGuard, PreemptionCheckpoint, RunMetrics,
                            StepProgressBar, Throughput)
from lrkv.checkpoint import (AtomicCheckpointIO, DamagedCheckpointError, Resume, RunDirError, RunLock, RunRecord,
                             describe, prepare_run_dir)
from lrkv.config import Config
from lrkv.data import DataError, LMData
from lrkv.export import export_checkpoint, load_export, save_export
from lrkv.inference.generator import Generator
from lrkv.lit import CheckpointMismatchError, LitLM
from lrkv.rundir import RunDir
from lrkv.strategy import trainer_kwargs
from lrkv.tokenizer import TokenizerError, eos_id, load_tokenizer

USER_ERRORS = (ConfigError, RunDirError, DamagedCheckpointError, DataError, TokenizerError, CheckpointMismatchError,
               NonFiniteLossError, DiskFullError)


def main(argv: list[str] | None = None, callbacks: tuple[L.Callback, ...] = ()) -> dict:
    """Train, export, sample. `callbacks` are extra Lightning callbacks (tests use them to interrupt a run)."""
    t_start = time.time()
    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    check_wandb(cfg)
    kwargs = trainer_kwargs(cfg)  # placement errors (no CUDA, launcher disagrees) before the run folder is read
    run = RunDir(cfg.run.dir)
    is_rank_zero = rank_zero_only.rank == 0  # from RANK / LOCAL_RANK / SLURM_PROCID, before any process group
    lock = RunLock(run.path).acquire() if is_rank_zero else None  # two runs in one folder would overwrite each other
    try:
        resume = prepare_run_dir(cfg, run.path)  # reads only: a refused start leaves the folder as it was
        if is_rank_zero:
            print("\n".join(describe(resume)) or f"new run in {run.path}", flush=True)
        return train(cfg, run, resume, kwargs, callbacks, t_start)
    finally:
        if lock is not None:
            lock.release()


def train(cfg: Config, run: RunDir, resume: Resume, kwargs: dict, callbacks: tuple[L.Callback, ...],
          t_start: float) -> dict:
    L.seed_everything(cfg.train.seed, verbose=False)  # same initial weights on every rank and every try

    # ---- data, model, logging, checkpoints
    data = LMData(cfg, run)
    lit = LitLM(cfg)
    loggers = [CSVLogger(run.path, name=run.csv.name)] if cfg.log.csv else []  # a new version_N folder per (re)start
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(run.path, name=run.tensorboard.name))
    if cfg.log.wandb:
        loggers.append(WandbLogger(project=cfg.log.wandb_project, save_dir=run.path, name=run.path.name))
    show_bar = cfg.log.progress_bar and sys.stderr.isatty()  # plain log lines in files / batch jobs
    curve = LossCurve(cfg.log.every, run.loss_curve)
    throughput = Throughput(cfg.log.every, cfg.data.seq_len, print_lines=not show_bar)
    metrics = RunMetrics(run.metrics, curve, throughput, cfg.data.seq_len * cfg.train.micro_batch_size)
    preempt = PreemptionCheckpoint(run.last)
    periodic = ModelCheckpoint(dirpath=run.checkpoints, filename=RunDir.STEP_NAME,
                               auto_insert_metric_name=False, every_n_train_steps=cfg.train.ckpt_every, save_top_k=cfg.train.keep_last,
                               monitor="step", mode="max", save_last=True,  # top-k by step = keep the last N
                               enable_version_counter=False)  # last.ckpt is also written on signals: replace it

    kwargs["plugins"] = [*kwargs.get("plugins", []), AtomicCheckpointIO()]
    trainer = L.Trainer(
        **kwargs,
        max_steps=cfg.train.max_steps,
        accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=cfg.train.grad_clip,
        val_check_interval=min(cfg.train.val_every, cfg.train.max_steps) * cfg.train.grad_accum,  # in micro-batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log.every,
        logger=loggers,
        callbacks=[throughput, curve, metrics, *([StepProgressBar()] if show_bar else []),  # metrics after curve
                   NonFiniteLossGuard(), RunRecord(cfg, run.path, resume), preempt, periodic, *callbacks],
        enable_progress_bar=show_bar,
        default_root_dir=run.path,
        use_distributed_sampler=False,  # LMData shards by rank itself
    )

    # ---- train
    trainer.fit(lit, datamodule=data, ckpt_path=resume.path)
    if preempt.stopped_at is not None:
        if trainer.is_global_zero:
            print(f"stopped by signal at step {preempt.stopped_at}; resume with --run.resume=auto")
        return {"trainer": trainer, "lit": lit, "curve": curve, "stopped_at": preempt.stopped_at}
    if trainer.global_step % cfg.train.ckpt_every:  # ModelCheckpoint saved multiples of ckpt_every only
        trainer.save_checkpoint(run.last, weights_only=False)

    # ---- export and sample (rank 0)
    result = {"trainer": trainer, "lit": lit, "curve": curve, "stopped_at": None}
    if not trainer.is_global_zero:
        return result
    if cfg.run.export and cfg.strategy.name == "deepspeed":  # ZeRO shards / bf16 copies: consolidate the fp32 master
        export_checkpoint(run.last, run.export, run.tokenizer)
    elif cfg.run.export:
        save_export(lit.model.state_dict(), cfg.model, run.export, run.tokenizer)
    model = load_export(run.export, device=lit.device) if cfg.run.export else lit.model.float().eval()
    tok = load_tokenizer(run.tokenizer, cfg.model.vocab_size)
    sample = Generator(model, tok, eos=[eos_id(tok)]).generate([cfg.run.sample_prompt], cfg.run.sample_tokens)[0]
    (first_step, first), (last_step, last) = curve.train[0], curve.train[-1]
    print(f"\n--- sample (greedy) ---\n{cfg.run.sample_prompt}{sample.text}\n---")
    print(f"loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step}); "
          f"wall time {time.time() - t_start:.1f} s; run folder {run.path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
