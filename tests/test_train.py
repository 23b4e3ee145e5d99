"""train.py end to end on a tiny model: exact resume, export round trip, schedule, guards and bad inputs."""

import importlib.util
import math
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lrkv.callbacks import NonFiniteLossError
from lrkv.checkpoint import RunDirError, prepare_run_dir
from lrkv.config import TrainConfig, parse_cli
from lrkv.data import DataError, shakespeare_files
from lrkv.export import load_export
from lrkv.lit import CheckpointMismatchError, lr_factor
from lrkv.model import Transformer
from lrkv.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = ["--model.vocab_size=320", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=2",
        "--model.head_dim=32", "--model.rank_k=4", "--model.rank_v=4", "--model.ffn_dim=128",
        "--model.max_seq_len=64", "--data.seq_len=32", "--data.val_fraction=0.25",
        "--train.micro_batch_size=4", "--train.grad_accum=2", "--train.max_steps=8", "--train.warmup_steps=2",
        "--train.lr=3e-3", "--train.val_every=4", "--train.val_batches=2", "--train.ckpt_every=4",
        "--log.every=1", "--log.tensorboard=false", "--log.progress_bar=false", "--run.sample_tokens=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for f in shakespeare_files()[:4]:
        shutil.copy(f, folder / f.name)
    return folder


def args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "lrkv_debug.yaml", *TINY, f"--data.source={corpus}", f"--run.dir={run_dir}", *extra]


class Record(L.Callback):
    """Per-micro-batch losses and the lr each optimizer step used; SIGTERMs itself after `kill_at` steps."""

    def __init__(self, kill_at: int | None = None):
        self.losses, self.lrs, self.kill_at = [], [], kill_at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    rec = Record()
    result = train.main(args(corpus, run_dir), callbacks=(rec,))
    return run_dir, rec, result


def test_resume_is_bit_identical(full_run, corpus, tmp_path):
    _, rec_full, full = full_run
    rec_a = Record(kill_at=4)
    first = train.main(args(corpus, tmp_path), callbacks=(rec_a,))
    stopped = first["stopped_at"]
    assert stopped is not None and stopped < 8  # SIGTERM -> checkpoint at a step boundary, clean return
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stopped
    assert not list((tmp_path / "checkpoints").glob("last-*"))  # replaced in place, never versioned aside
    rec_b = Record()
    second = train.main(args(corpus, tmp_path, "--run.resume=auto"), callbacks=(rec_b,))
    assert second["trainer"].global_step == 8
    assert rec_a.losses + rec_b.losses == rec_full.losses  # exact float equality, every micro-batch
    done, ref = second["lit"].model.state_dict(), full["lit"].model.state_dict()
    assert all(torch.equal(done[k], ref[k]) for k in ref)
    assert (tmp_path / "tokenizer.json").read_bytes() != b""
    assert [s for s, _ in second["curve"].train][:2] == [1, 2]  # curve history came back from the checkpoint


def test_export_gives_the_trained_modules_logits(full_run):
    run_dir, _, result = full_run
    trained = result["lit"].model.eval()
    exported = load_export(run_dir / "export")
    idx = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(idx), trained(idx))
    assert (run_dir / "export" / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    curve = result["curve"].train
    assert curve[0][0] == 1 and abs(curve[0][1] - math.log(320)) < 0.05  # untrained: ~uniform over the vocab
    assert curve[-1] == (8, pytest.approx(float(result["trainer"].callback_metrics["train/loss"])))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert kept == ["step-000004.ckpt", "step-000008.ckpt"]  # keep_last=2 of steps 4, 8


def test_schedule_used_by_the_optimizer(full_run):
    _, rec, _ = full_run
    # wsd, 8 steps, warmup 2, decay over the last round(0.2*8)=2 steps to min_lr_ratio 0.1, lr 3e-3
    expected = [3e-3 * f for f in (0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0 - 0.9 * 0.5)]
    assert rec.lrs == pytest.approx(expected, rel=1e-12)


def test_lr_schedules_at_key_steps():
    t = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2, schedule="wsd")
    hand = {0: 0.1, 9: 1.0, 10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 99: 1 - 0.9 * 19 / 20}
    assert {s: lr_factor(s, t) for s in hand} == pytest.approx(hand)
    t.schedule = "cosine"
    hand = {0: 0.1, 10: 1.0, 55: 0.55, 99: 0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90))}
    assert {s: lr_factor(s, t) for s in hand} == pytest.approx(hand)
    t.schedule = "constant"
    assert [lr_factor(s, t) for s in (4, 10, 99)] == pytest.approx([0.5, 1.0, 1.0])


def test_non_finite_loss_stops_naming_the_step(corpus, tmp_path, monkeypatch):
    forward = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # micro-batch 5 = first half of optimizer step 3 (grad_accum=2)
                return out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3 of 8"):
        train.main(args(corpus, tmp_path, "--train.ckpt_every=1"))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.ckpt")) == ["step-000001.ckpt", "step-000002.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2


def test_run_dir_of_another_run_is_refused_untouched(full_run, corpus):
    run_dir = full_run[0]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(RunDirError, match=r"already holds another run.*train\.seed: 1337 -> 7"):
        train.main(args(corpus, run_dir, "--train.seed=7"))
    with pytest.raises(RunDirError, match="--run.resume=auto"):
        train.main(args(corpus, run_dir, "--train.lr=1e-3"))  # a schedule change is this run, not another
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_folder_of_an_attempt_without_checkpoints_is_reused(corpus, tmp_path):
    cfg = parse_cli(args(corpus, tmp_path))
    with pytest.raises(DataError, match="missing.txt: data file or folder not found"):
        train.main(args(tmp_path / "missing.txt", tmp_path))
    assert list(tmp_path.iterdir()) == []  # the failed start wrote nothing: no config.yaml, data/ or logs
    assert prepare_run_dir(cfg, tmp_path).path is None  # no checkpoint there: nothing to protect


def test_checkpoint_of_another_config_is_refused(full_run, corpus, tmp_path):
    last = full_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatchError, match=r"model\.ffn_dim: 128 -> 160"):
        train.main(args(corpus, tmp_path, "--model.ffn_dim=160", f"--run.resume={last}"))


def test_tokenizer_with_more_tokens_than_the_model_is_refused(full_run, corpus, tmp_path):
    tok = full_run[0] / "tokenizer.json"
    with pytest.raises(TokenizerError, match="320 tokens but model.vocab_size is 300"):
        train.main(args(corpus, tmp_path, f"--data.tokenizer={tok}", "--model.vocab_size=300"))
