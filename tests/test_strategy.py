"""strategy.trainer_kwargs: placement, DeepSpeed config validation, launcher agreement. No processes started."""

import os

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lrkv.config import ConfigError, load_config
from lrkv.strategy import CPUDeepSpeedStrategy, deepspeed_config, detect_launch, trainer_kwargs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
               "SLURM_NTASKS", "SLURM_NNODES", "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """Tests start outside any launcher, whatever the CI job runs under."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "unset")  # recorded, so what trainer_kwargs sets is undone afterwards
    monkeypatch.delenv("DS_ACCELERATOR")


def cfg(*overrides, config=None):
    return load_config(config, list(overrides))


def torchrun_env(monkeypatch, nodes: int, per_node: int) -> None:
    for var, value in {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": str(nodes * per_node), "LOCAL_WORLD_SIZE": str(per_node)}.items():
        monkeypatch.setenv(var, value)


def slurm_env(monkeypatch, nodes: int, per_node: int) -> None:
    for var, value in {"SLURM_NTASKS": str(nodes * per_node), "SLURM_NNODES": str(nodes),
                       "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_JOB_NAME": "lrkv"}.items():
        monkeypatch.setenv(var, value)


@no_cuda
def test_single_and_ddp_on_cpu():
    kw = trainer_kwargs(cfg("--strategy.name=single"))
    assert kw == {"strategy": "auto", "accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true"}
    kw = trainer_kwargs(cfg("--strategy.name=ddp", "--strategy.devices=2"))
    assert isinstance(kw["strategy"], DDPStrategy) and kw["strategy"]._process_group_backend == "gloo"
    assert (kw["devices"], kw["precision"]) == (2, "32-true")


@no_cuda
def test_deepspeed_without_cuda_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="DeepSpeed needs CUDA; use strategy.name=ddp, or set strategy.accelerator=cpu"):
        trainer_kwargs(cfg(config="lrkv_2p5b.yaml"))
    with pytest.raises(ConfigError, match="strategy.accelerator: 'cuda' but no CUDA device"):
        trainer_kwargs(cfg("--strategy.accelerator=cuda"))


def test_deepspeed_on_cpu_opt_in(monkeypatch):
    kw = trainer_kwargs(cfg("--strategy.accelerator=cpu", config="lrkv_2p5b.yaml"))
    strategy = kw["strategy"]
    assert isinstance(strategy, CPUDeepSpeedStrategy) and strategy._process_group_backend == "gloo"
    assert (kw["accelerator"], kw["precision"]) == ("cpu", "32-true")
    assert strategy.config["zero_optimization"]["stage"] == 2  # the 2.5B default
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8  # lrkv_2p5b's train.micro_batch_size
    assert strategy.config["gradient_clipping"] == 1.0
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_deepspeed_config_defaults_and_offload():
    ds = deepspeed_config(cfg("--strategy.name=deepspeed", "--train.micro_batch_size=3", "--train.grad_clip=0.5"))
    assert ds["zero_optimization"] == {"stage": 2}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"]) == (3, 0.5)
    assert "gradient_accumulation_steps" not in ds  # Lightning sets it from Trainer(accumulate_grad_batches)
    ds = deepspeed_config(cfg("--strategy.deepspeed={zero_optimization: {stage: 3, offload_optimizer: {device: cpu},"
                              " offload_param: {device: cpu}}}"))
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW is accepted with offload


@pytest.mark.parametrize("ds, message", [
    ("{zero_optimization: {stage: 4}}", r"strategy.deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got 4"),
    ("{zero_optimization: {stage: 3, offload_param: {device: gpu}}}",
     r"strategy.deepspeed.zero_optimization.offload_param.device: must be one of"),
    ("{zero_optimization: {stage: 2, offload_param: {device: cpu}}}",
     r"strategy.deepspeed.zero_optimization.offload_param: needs zero_optimization.stage >= 3"),
    ("{zero_optimization: {stage: 3, offload_optimizer: {device: nvme}}}",
     r"strategy.deepspeed.zero_optimization.offload_optimizer.nvme_path: required"),
    ("{zero_optimization: {stage: 3, offload_param: {device: nvme, nvme_path: ''}}}",
     r"strategy.deepspeed.zero_optimization.offload_param.nvme_path: required"),
    ("{gradient_accumulation_steps: 4}", r"strategy.deepspeed.gradient_accumulation_steps: set by lrkv from train.grad_accum"),
    ("{train_micro_batch_size_per_gpu: 2}", r"strategy.deepspeed.train_micro_batch_size_per_gpu: 2 disagrees"),
    ("{optimizer: {type: Adam}}", r"strategy.deepspeed.optimizer: set by lrkv"),
    ("{zero_optimization: 2}", r"strategy.deepspeed.zero_optimization: expected a mapping"),
    # keys DeepSpeed would ignore (its parser never asks for them) or refuse (its pydantic models), at any depth
    ("{zero_optimisation: {stage: 3}}",
     r"^strategy\.deepspeed\.zero_optimisation: not a DeepSpeed config key.*did you mean 'zero_optimization'"),
    ("{zero_optimization: {stag: 3}}", r"^strategy\.deepspeed\.zero_optimization\.stag: not a DeepSpeed config key"),
    ("{zero_optimization: {stage: 3, offload_param: {device: cpu, pin_memroy: true}}}",
     r"^strategy\.deepspeed\.zero_optimization\.offload_param\.pin_memroy: not a DeepSpeed config key"),
    ("{activation_checkpointing: {cpu_checkpointng: true}}",
     r"^strategy\.deepspeed\.activation_checkpointing\.cpu_checkpointng: not a DeepSpeed config key"),
    ("{zero_optimization: {stage: 2, reduce_bucket_size: lots}}",
     r"^strategy\.deepspeed\.zero_optimization\.reduce_bucket_size: .*integer"),
])
def test_deepspeed_config_errors_name_the_key(ds, message):
    with pytest.raises(ConfigError, match=message):
        trainer_kwargs(cfg("--strategy.name=deepspeed", "--strategy.accelerator=cpu", f"--strategy.deepspeed={ds}"))


def test_deepspeed_keys_it_reads_are_accepted():
    """Keys from DeepSpeed's documented sections, read key by key or by its pydantic models, pass the key check."""
    ds = ("{zero_optimization: {stage: 3, overlap_comm: true, stage3_prefetch_bucket_size: 1000000,"
          " sub_group_size: 1000, offload_optimizer: {device: cpu, pin_memory: true}, offload_param: {device: nvme, nvme_path: /nvme}},"
          " activation_checkpointing: {partition_activations: true, number_checkpoints: 4},"
          " aio: {block_size: 1048576, queue_depth: 8}, flops_profiler: {enabled: false, profile_step: 1},"
          " tensorboard: {enabled: false, output_path: tb}, comms_logger: {enabled: false},"
          " checkpoint: {tag_validation: Warn, parallel_write: {pipeline_stage: false}},"
          " timers: {throughput: {enabled: true}}, steps_per_print: 10, wall_clock_breakdown: false}")
    kw = trainer_kwargs(cfg("--strategy.name=deepspeed", "--strategy.accelerator=cpu", f"--strategy.deepspeed={ds}"))
    assert kw["strategy"].config["zero_optimization"]["offload_param"]["nvme_path"] == "/nvme"
    assert kw["strategy"].config["aio"] == {"block_size": 1048576, "queue_depth": 8}


@pytest.mark.parametrize("env", [torchrun_env, slurm_env])
def test_launcher_sets_nodes_and_devices(monkeypatch, env):
    env(monkeypatch, nodes=2, per_node=3)
    launch = detect_launch()
    assert (launch.num_nodes, launch.procs_per_node) == (2, 3)
    kw = trainer_kwargs(cfg("--strategy.name=ddp"))
    assert (kw["devices"], kw["num_nodes"]) == (3, 2)
    kw = trainer_kwargs(cfg("--strategy.name=ddp", "--strategy.num_nodes=2", "--strategy.devices=3"))
    assert (kw["devices"], kw["num_nodes"]) == (3, 2)


@pytest.mark.parametrize("override, message", [
    ("--strategy.num_nodes=4", r"strategy.num_nodes: config says 4 but torchrun started 2 node\(s\) x 1 process"),
    ("--strategy.devices=2", r"strategy.devices: config says 2 but torchrun started 2 node\(s\)"),
    ("--strategy.name=single", r"strategy.name: 'single' cannot run as several processes"),
])
def test_launcher_disagreement_is_refused(monkeypatch, override, message):
    torchrun_env(monkeypatch, nodes=2, per_node=1)
    with pytest.raises(ConfigError, match=message):
        trainer_kwargs(cfg(override))


def test_no_launcher_uses_config():
    assert detect_launch() is None
    kw = trainer_kwargs(cfg("--strategy.name=ddp", "--strategy.accelerator=cpu", "--strategy.num_nodes=3"))
    assert (kw["devices"], kw["num_nodes"]) == ("auto", 3)

