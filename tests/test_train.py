"""train.py end to end on a tiny model: exact resume, export round trip, schedule, guards and bad inputs."""

import csv
import errno
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lrkv.atomic import DiskFullError
from lrkv.callbacks import NonFiniteLossError
from lrkv.checkpoint import DamagedCheckpointError, RunDirError, prepare_run_dir
from lrkv.config import TrainConfig, parse_cli
from lrkv.data import DataError, shakespeare_files
from lrkv.export import load_export
from lrkv.lit import CheckpointMismatchError
from lrkv.model import Transformer
from lrkv.optim import lr_factor
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
    """Per-micro-batch losses and batch digests, the lr each optimizer step used; sends itself `signals` once
    `kill_at` optimizer steps are done."""

    def __init__(self, kill_at: int | None = None, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.losses, self.lrs, self.batches, self.kill_at, self.signals = [], [], [], kill_at, signals

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.batches.append(hashlib.sha256(batch[0].numpy().tobytes()).hexdigest())
        if trainer.global_step == self.kill_at and batch_idx % 2 == 0:  # mid-step: the first of 2 micro-batches
            for s in self.signals:
                os.kill(os.getpid(), s)


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
    resumed, straight = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, full_run[0]))
    assert resumed["val_loss"] == straight["val_loss"] and resumed["tokens_seen"] == straight["tokens_seen"]


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


def test_metrics_json_agrees_with_the_csv_log_and_is_what_compare_reads(full_run):
    from eval.compare import step_cost, val_curve

    run_dir, _, result = full_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # Lightning's CSV logs the index of the batch just finished: optimizer steps done - 1
    logged_val = [(int(r["step"]) + 1, float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert [s for s, _ in logged_val] == [4, 8]  # val_every=4 of max_steps=8
    assert val_curve(run_dir) == logged_val and metrics["final_val_loss"] == logged_val[-1][1]
    assert metrics["train_loss"][-1] == [8, float(result["trainer"].callback_metrics["train/loss"])]
    tokens_per_step = 32 * 4 * 2  # seq_len x micro_batch_size x grad_accum, one process
    flops_per_token = load_export(run_dir / "export").num_flops_per_token(32)
    assert step_cost(run_dir) == (tokens_per_step, flops_per_token * tokens_per_step)
    assert metrics["tokens_seen"] == 8 * tokens_per_step and metrics["mfu"] is None  # CPU: no peak known
    # the run's tokens/s is the time-weighted mean of the logged per-step windows, so it lies within their range
    windows = [float(r["perf/tokens_per_s_per_device"]) for r in rows if r.get("perf/tokens_per_s_per_device")]
    assert len(windows) == 8 and min(windows) * (1 - 1e-9) <= metrics["tokens_per_s_per_device"] <= max(windows) * (1 + 1e-9)


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


# ---------------------------------------------------------------------------------------------------- faults


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("export", "csv"))
    return to


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in folder.rglob("*")}


def _edited(data: bytes, edit) -> bytes:
    ckpt = torch.load(io.BytesIO(data), weights_only=False)
    edit(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


DAMAGE = {"truncated": lambda b: b[: len(b) // 2], "garbage": lambda b: bytes(range(256)) * 64, "empty": lambda b: b"",
          "not_train_py": lambda b: _edited(b, lambda c: c.pop("hyper_parameters")),
          "no_loader_position": lambda b: _edited(b, lambda c: c["loops"]["fit_loop"]["state_dict"].clear())}
REASON = {"truncated": "not a complete checkpoint", "garbage": "not a complete checkpoint", "empty": "empty file",
          "not_train_py": "holds no lrkv config", "no_loader_position": "holds no data-loader position"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_auto_resume_skips_damaged_checkpoints_to_the_newest_good_one(full_run, corpus, tmp_path, capsys, damage):
    _, rec_full, full = full_run
    run_dir = copy_run(full_run[0], tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    for name in ("last.ckpt", "step-000008.ckpt"):  # both step-8 copies damaged: step 4 is the newest good one
        (ckpts / name).write_bytes(DAMAGE[damage]((ckpts / name).read_bytes()))
    capsys.readouterr()
    rec = Record()
    result = train.main(args(corpus, run_dir, "--run.resume=auto"), callbacks=(rec,))
    out = capsys.readouterr().out
    for name in ("last.ckpt", "step-000008.ckpt"):
        assert f"notice: skipped {name}: {REASON[damage]}" in out
    assert f"resuming from {ckpts / 'step-000004.ckpt'} (step 4)" in out
    assert rec.losses == rec_full.losses[8:]  # steps 5-8 exactly as in the uninterrupted run
    done, ref = result["lit"].model.state_dict(), full["lit"].model.state_dict()
    assert all(torch.equal(done[k], ref[k]) for k in ref)


def test_damaged_explicit_checkpoint_is_one_error_and_nothing_changes(full_run, corpus, tmp_path):
    run_dir = copy_run(full_run[0], tmp_path / "run")
    bad = run_dir / "checkpoints" / "last.ckpt"
    bad.write_bytes(bad.read_bytes()[:1000])
    for c in run_dir.glob("checkpoints/step-*"):
        c.write_bytes(b"")
    before = snapshot(run_dir)
    with pytest.raises(DamagedCheckpointError, match=rf"--run.resume={bad}: not a complete checkpoint \(1,000 bytes, "):
        train.main(args(corpus, run_dir, f"--run.resume={bad}"))
    with pytest.raises(DamagedCheckpointError, match=r"--run.resume=auto: no usable checkpoint .*step-000004.ckpt: "
                                                     r"empty file"):
        train.main(args(corpus, run_dir, "--run.resume=auto"))
    other = tmp_path / "other"
    with pytest.raises(CheckpointMismatchError, match=r"model\.ffn_dim: 128 -> 160"):
        train.main(args(corpus, other, "--model.ffn_dim=160", f"--run.resume={full_run[0] / 'checkpoints/last.ckpt'}"))
    assert snapshot(run_dir) == before and not other.exists()  # no config.yaml rewrite, no log folders, no lock


def test_second_run_in_a_folder_in_use_is_refused(corpus, tmp_path):
    from lrkv.checkpoint import RunLock

    run_dir = tmp_path / "run"
    holder = RunLock(run_dir).acquire()  # what a running train.py holds
    try:
        with pytest.raises(RunDirError, match=rf"{run_dir} is in use by another train.py \(pid {os.getpid()}"):
            train.main(args(corpus, run_dir))
        assert [p.name for p in run_dir.iterdir()] == [".lock"]
    finally:
        holder.release()
    assert not run_dir.exists()  # the holder created it and nothing else was written


def test_run_dir_that_cannot_be_written_is_refused_before_anything_runs(corpus, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    with pytest.raises(RunDirError, match=rf"^run.dir: {re.escape(str(afile))} is a file, not a folder"):
        train.main(args(corpus, afile))
    with pytest.raises(RunDirError, match=rf"^run.dir: cannot write in {re.escape(str(afile / 'run'))} \(Not a dir"):
        train.main(args(corpus, afile / "run"))
    assert afile.read_text() == "kept"
    # a read-only folder: root writes through chmod, so the lock file's creation fails as the OS reports it
    read_only, real_open = tmp_path / "read_only", os.open

    def refuse(path, *rest):
        if Path(path).parent == read_only:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *rest)

    read_only.mkdir()
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RunDirError, match=rf"^run.dir: cannot write in {re.escape(str(read_only))} \(Permission"):
        train.main(args(corpus, read_only))
    assert list(read_only.iterdir()) == []


def test_schedule_changes_on_resume_40_to_80(corpus, tmp_path):
    """40 steps, then resumed with train.max_steps=80: from step 40 on the lr follows the 80-step WSD schedule.

    At the boundary the lr jumps from the 40-step schedule's decayed value (its last 8 steps decay) back to the
    80-step schedule's plateau; steps before the 40-step run began decaying saw the same lr as a straight 80-step
    run, so their losses are identical, and the resumed run trains on exactly the batches the straight run sees.
    """
    common = ("--train.ckpt_every=20", "--train.val_every=1000", "--run.export=false")
    straight = Record()
    train.main(args(corpus, tmp_path / "straight", "--train.max_steps=80", *common), callbacks=(straight,))
    run_dir = tmp_path / "run"
    first, second = Record(), Record()
    train.main(args(corpus, run_dir, "--train.max_steps=40", *common), callbacks=(first,))
    (run_dir / "NOTES.md").write_text("my notes")
    result = train.main(args(corpus, run_dir, "--train.max_steps=80", *common, "--run.resume=auto"),
                        callbacks=(second,))
    assert result["trainer"].global_step == 80
    decay_start = 40 - round(0.2 * 40)  # 32: the 40-step run's lr is the straight run's before this step
    assert first.lrs[:decay_start] == straight.lrs[:decay_start] and first.lrs[-1] < straight.lrs[39]
    assert first.losses[:2 * (decay_start + 1)] == straight.losses[:2 * (decay_start + 1)]
    assert second.lrs == straight.lrs[40:]  # exactly the new-length schedule from the resume point on
    assert second.lrs[0] == 3e-3  # back on the 80-step plateau
    assert second.batches == straight.batches[80:]  # the data continues where it stopped
    log = (run_dir / "config_changes.log").read_text().splitlines()
    assert len(log) == 1 and log[0].endswith("at step 40: train.max_steps: 40 -> 80")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 80
    assert (run_dir / "NOTES.md").read_text() == "my notes"


def test_lower_lr_on_resume_takes_effect_at_once(full_run, corpus, tmp_path):
    run_dir = copy_run(full_run[0], tmp_path / "run")
    rec = Record()
    train.main(args(corpus, run_dir, "--train.lr=1e-3", "--train.max_steps=10", "--run.resume=auto",
                    "--run.export=false"), callbacks=(rec,))
    t = parse_cli(args(corpus, run_dir, "--train.lr=1e-3", "--train.max_steps=10")).train
    assert rec.lrs == [1e-3 * lr_factor(s, t) for s in (8, 9)]


def test_ctrl_c_saves_at_the_step_boundary_and_a_second_one_aborts(full_run, corpus, tmp_path):
    _, rec_full, _ = full_run
    rec = Record(kill_at=2, signals=(signal.SIGINT,))
    first = train.main(args(corpus, tmp_path / "once"), callbacks=(rec,))
    assert first["stopped_at"] == 3  # the step in flight finished, then saved and stopped
    assert torch.load(tmp_path / "once" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert rec.losses == rec_full.losses[:6]
    twice = Record(kill_at=2, signals=(signal.SIGINT, signal.SIGINT))
    with pytest.raises(SystemExit):  # KeyboardInterrupt -> Lightning's shutdown, exit code 1, nothing saved
        train.main(args(corpus, tmp_path / "twice", "--train.ckpt_every=100"), callbacks=(twice,))
    assert not list((tmp_path / "twice" / "checkpoints").glob("*.ckpt"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_disk_full_while_checkpointing_is_one_error_and_resume_is_exact(full_run, corpus, tmp_path, monkeypatch):
    _, rec_full, full = full_run
    save = torch.save

    def full_disk(obj, f, *a, **kw):
        if "step-000004" in getattr(f, "name", ""):
            f.write(b"\0" * 4096)  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "step-000004.ckpt"
    with pytest.raises(DiskFullError, match=rf"{target}: no space left on the device \(needs about ") as e:
        train.main(args(corpus, tmp_path, "--train.ckpt_every=2"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    need_mb = float(str(e.value).split("needs about ")[1].split(" MB")[0])  # the estimate vs a real checkpoint's size
    assert need_mb == pytest.approx((tmp_path / "checkpoints" / "step-000002.ckpt").stat().st_size / 1e6, rel=0.1)
    monkeypatch.setattr(torch, "save", save)  # space freed
    rec = Record()
    result = train.main(args(corpus, tmp_path, "--train.ckpt_every=2", "--run.resume=auto"), callbacks=(rec,))
    assert rec.losses == rec_full.losses[4:]
    done, ref = result["lit"].model.state_dict(), full["lit"].model.state_dict()
    assert all(torch.equal(done[k], ref[k]) for k in ref)


def test_disk_full_while_caching_data_is_one_error_and_leaves_no_temp_file(corpus, tmp_path, monkeypatch):
    import numpy as np

    np_save = np.save

    def full_disk(f, array, *a, **kw):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(DiskFullError, match=rf"{tmp_path / 'data' / 'train.npy'}: no space left on the device"):
        train.main(args(corpus, tmp_path))
    monkeypatch.setattr(np, "save", np_save)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["data", "tokenizer.json"]


def test_config_typo_fails_before_the_heavy_imports(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['train.py', '--config', 'lrkv_debug.yaml', '--train.max_step=5']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["exit", "1", "False", "False"]
    assert out.stderr.splitlines() == ["error: unknown config key 'train.max_step' (did you mean 'max_steps'?)"]


KILLED_WHILE_SAVING = '''
import os, signal, sys
from pathlib import Path

import lightning as L
import torch

import train

save = torch.save


def killing_save(obj, f, *args, **kwargs):
    if "step-000006" in getattr(f, "name", ""):  # SIGKILL with half of step-6's checkpoint on disk
        f.write(b"\\0" * 100_000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)


class Losses(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.environ["LOSSES"], "a") as f:
            f.write(outputs["loss"].item().hex() + "\\n")


torch.save = killing_save
train.main(sys.argv[1:], callbacks=(Losses(),))
'''


def test_sigkill_while_writing_a_checkpoint_then_resume_matches_the_uninterrupted_run(full_run, corpus, tmp_path):
    _, rec_full, full = full_run
    script, losses, run_dir = tmp_path / "probe.py", tmp_path / "losses.txt", tmp_path / "run"
    script.write_text(KILLED_WHILE_SAVING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOSSES": str(losses), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), *args(corpus, run_dir, "--train.ckpt_every=2")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / ".step-000006.ckpt.tmp").stat().st_size >= 100_000  # the kill hit mid-write
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4
    killed = [float.fromhex(x) for x in losses.read_text().split()]
    assert len(killed) == 12 and killed == rec_full.losses[:12]  # it trained through step 6

    class LeftoversAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.found = sorted(p.name for p in ckpts.glob(".*.tmp"))

    rec, leftovers = Record(), LeftoversAtStart()
    result = train.main(args(corpus, run_dir, "--train.ckpt_every=2", "--run.resume=auto"), callbacks=(rec, leftovers))
    assert killed[:8] + rec.losses == rec_full.losses  # steps 1-4 before the kill, 5-8 after the resume
    done, ref = result["lit"].model.state_dict(), full["lit"].model.state_dict()
    assert all(torch.equal(done[k], ref[k]) for k in ref)
    # the killed run's half-written temp file is removed as the resumed run starts (not only if step 6 is saved again)
    assert leftovers.found == [] and not (run_dir / ".lock").exists()
