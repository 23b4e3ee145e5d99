"""Multi-process training through the real train.py on CPU (gloo, one thread per rank, a free port per test).

Two "nodes" on 127.0.0.1: two torchrun agents (--nnodes 2, node ranks 0 and 1, one process each), or (slow) two
processes with the variables `srun` sets, train a few steps with DDP.

Each rank records, through train.main's `callbacks` hook, a digest of every training batch it saw and of its
weights before and after training. Both ranks must have trained on disjoint batches and finished with identical
weights that differ from the initial ones, and the checkpoint rank 0 wrote must hold exactly those weights.

DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes: sharded checkpoints, resume, consolidation into an export.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrkv.export import export_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4

PROBE = '''
import hashlib, json, os, sys
from pathlib import Path

import lightning as L

import train


def digest(module):
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(L.Callback):
    def __init__(self):
        self.record = {"batches": []}

    def on_train_start(self, trainer, pl_module):
        self.record["initial"] = digest(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["batches"].append(hashlib.sha256(batch[0].cpu().numpy().tobytes()).hexdigest())

    def on_train_end(self, trainer, pl_module):
        self.record.update(final=digest(pl_module.model), rank=trainer.global_rank, node=trainer.node_rank,
                           world=trainer.world_size, steps=trainer.global_step)
        Path(os.environ["PROBE_DIR"], f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


train.main(sys.argv[1:], callbacks=(Probe(),))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tmp_path: Path) -> Path:
    """A 2-layer model on a 60 kB slice of the embedded corpus: the tokenizer and data cache build in a second."""
    from lrkv.data import shakespeare_files

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_files()[0].read_text()[:60_000])
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
model: {{attn: lrkv, vocab_size: 320, n_layer: 2, d_model: 64, n_head: 2, head_dim: 32, rank_k: 4, rank_v: 4,
         ffn_dim: 128, max_seq_len: 64}}
data: {{source: {corpus}, text_sample_by: paragraph, seq_len: 32, val_fraction: 0.05}}
train: {{max_steps: {STEPS}, micro_batch_size: 4, warmup_steps: 1, val_every: 100, val_batches: 1, ckpt_every: {STEPS},
         lr: 1.0e-3}}
log: {{every: 1, tensorboard: false, progress_bar: false}}
run: {{sample_tokens: 4}}
""")
    return path


def state_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def launch(launcher: str, node: int, port: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment of one "node": a torchrun agent, or the process `srun` would start there."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", *args], {}
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(node),
             "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "1",
             "SLURM_JOB_NAME": "lrkv", "MASTER_PORT": str(port)}
    return [sys.executable, *args], slurm


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("srun", marks=pytest.mark.slow)])
def test_two_nodes_ddp(tmp_path, launcher):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config, run_dir = tiny_config(tmp_path), tmp_path / "run"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = [str(probe), "--config", str(config), f"--run.dir={run_dir}", "--strategy.name=ddp"]
    procs = []
    for node in (0, 1):
        cmd, extra_env = launch(launcher, node, port, args)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["node"], r1["node"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["steps"] == r1["steps"] == STEPS
    assert len(r0["batches"]) == len(r1["batches"]) == STEPS
    assert not set(r0["batches"]) & set(r1["batches"]), "the two ranks trained on overlapping batches"
    assert r0["initial"] == r1["initial"] and r0["final"] == r1["final"], "ranks ended with different weights"
    assert r0["final"] != r0["initial"], "the weights did not change"

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert state_digest(saved) == r0["final"], "the checkpoint does not hold the trained weights"


def run_train(config: Path, run_dir: Path, *overrides: str) -> str:
    """train.py as its own process; Lightning's launcher starts the second rank (devices=2)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "train.py", "--config", str(config), f"--run.dir={run_dir}", *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"train.py failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_trains_resumes_and_exports(tmp_path, stage):
    """2 CPU processes, gloo: sharded checkpoints, a resume from the half-way one, ZeRO -> fp32 export.

    The last ZeRO checkpoint of the uninterrupted run, consolidated by lrkv.export, must hold exactly the weights
    the module held at the end of training, both in that run and in a run resumed half-way (train.py's exports).
    """
    config, full = tiny_config(tmp_path), tmp_path / "full"
    ds = ["--strategy.name=deepspeed", "--strategy.accelerator=cpu", "--strategy.devices=2",
          f"--strategy.deepspeed={{zero_optimization: {{stage: {stage}}}}}", f"--train.ckpt_every={STEPS // 2}"]
    run_train(config, full, *ds)
    half = full / "checkpoints" / f"step-{STEPS // 2:06d}.ckpt"
    shards = {p.name for p in (half / (half / "latest").read_text()).iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards

    resumed = tmp_path / "resumed"  # same tokenizer and data cache; only the checkpoints after half-way dropped
    shutil.copytree(full, resumed, ignore=lambda d, names: [n for n in names if n in ("last.ckpt", "export")
                                                             or n.startswith(f"step-{STEPS:06d}")])
    run_train(config, resumed, *ds, f"--run.resume={resumed / 'checkpoints' / half.name}")

    exported = load_file(export_checkpoint(full, tmp_path / "export") / "model.safetensors")  # full/checkpoints/last
    for run in (full, resumed):  # train.py's own exports: the weights the module held at the end
        own = load_file(run / "export" / "model.safetensors")
        assert own.keys() == exported.keys()
        for name, t in exported.items():
            assert torch.equal(t, own[name]), f"{name}: {run.name}/export differs from the consolidated ZeRO checkpoint"


KILL_AT_PUBLISH = '''
import os, sys, time
from pathlib import Path

import lrkv.strategy
import train

publish = lrkv.strategy.publish_tag


def hold_at_publish(folder, tag):
    # every rank has written step 4's shards into last.ckpt; `latest` still names step 2's: be killed here
    if folder.name == "last.ckpt" and tag == "step4":
        Path(os.environ["MARKER"]).write_text(tag)
        time.sleep(600)
    publish(folder, tag)


lrkv.strategy.publish_tag = hold_at_publish
train.main(sys.argv[1:])
'''


@pytest.mark.slow
def test_deepspeed_killed_while_publishing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """ZeRO-2 on 2 CPU processes, checkpoints at steps 2 and 4: both processes are SIGKILLed (from this one) after
    step 4's shards of last.ckpt are on disk but before `latest` names them. last.ckpt still loads as step 2, and
    the resumed run ends with exactly the uninterrupted run's weights."""
    config, full, run = tiny_config(tmp_path), tmp_path / "full", tmp_path / "run"
    ds = ["--strategy.name=deepspeed", "--strategy.accelerator=cpu", "--strategy.devices=2",
          "--strategy.deepspeed={zero_optimization: {stage: 2}}", f"--train.ckpt_every={STEPS // 2}"]
    run_train(config, full, *ds)

    script, marker = tmp_path / "probe.py", tmp_path / "marker"
    script.write_text(KILL_AT_PUBLISH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "MARKER": str(marker),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), "--config", str(config), f"--run.dir={run}", *ds], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), f"the run never reached step 4's publish (exit code {proc.poll()})"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank-1 process Lightning started
        proc.wait()
    last = run / "checkpoints" / "last.ckpt"
    assert (last / "latest").read_text() == "step2" and (last / "step4").is_dir()  # step 4 written, not published

    out = run_train(config, run, *ds, "--run.resume=auto")
    assert f"resuming from {last} (step 2)" in out
    tag = (last / "latest").read_text()  # step4.1: the killed run's unpublished step4 tag is not reused
    assert tag.startswith("step4") and [p.name for p in last.iterdir() if p.is_dir()] == [tag]  # old tags removed
    resumed, ref = (load_file(r / "export" / "model.safetensors") for r in (run, full))
    assert resumed.keys() == ref.keys() and all(torch.equal(resumed[k], ref[k]) for k in ref)
