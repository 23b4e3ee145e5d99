import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from lrkv.config import CONFIG_DIR, PRECISIONS, Config, ConfigError, config_from_dict, load_config, parse_cli, read_yaml

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_shipped_configs_exist():
    for name in ("lrkv_debug.yaml", "lrkv_125m.yaml", "lrkv_2p5b.yaml", "mha_2p5b.yaml", "gqa_2p5b.yaml",
                 "mla_2p5b.yaml", "mha_125m.yaml", "gqa_125m.yaml", "mla_125m.yaml"):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_parses_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    # the raw YAML (after inheritance) must not carry keys the dataclasses silently drop
    raw = read_yaml(name)
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"


def test_baseline_inherits_everything_but_attention():
    lrkv, mha = load_config("lrkv_2p5b.yaml"), load_config("mha_2p5b.yaml")
    assert (lrkv.model.attn, mha.model.attn) == ("lrkv", "mha")
    for key in ("n_layer", "d_model", "n_head", "head_dim", "ffn_dim", "vocab_size"):
        assert getattr(lrkv.model, key) == getattr(mha.model, key)
    assert lrkv.train == mha.train and lrkv.strategy == mha.strategy
    assert mha.run.dir == "runs/mha_2p5b"


def test_config_name_resolves_into_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root: the bare name must still resolve
    assert load_config("lrkv_2p5b.yaml").model.n_layer == 18
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.yaml")


def test_dotted_overrides_both_spellings_and_types():
    cfg = parse_cli(["--config", "lrkv_debug.yaml", "--model.rank_k=16", "--train.lr", "1e-3",
                     "--model.tie_embeddings=true", "--run.resume=null", "--strategy.deepspeed={zero_optimization: {stage: 3}}"])
    assert cfg.model.rank_k == 16 and cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.tie_embeddings is True and cfg.run.resume is None
    assert cfg.strategy.deepspeed == {"zero_optimization": {"stage": 3}}
    assert parse_cli(["--config=lrkv_debug.yaml", "--train.lr=2"]).train.lr == 2.0  # int accepted for float


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("lrkv_2p5b.yaml", ["--model.rank_v=32"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    "overrides, key, rule",
    [
        (["--model.rnak_k=4"], "model.rnak_k", "did you mean 'rank_k'"),
        (["--trian.lr=1"], "trian", "did you mean 'train'"),
        (["--model.head_dim=48"], "model.head_dim", "must be one of"),
        (["--model.rank_k=33"], "model.rank_k", r"rank must be in \[0, head_dim=32\]"),
        (["--model.head_dim=null", "--model.d_model=130"], "model.d_model", "not divisible by n_head"),
        (["--model.attn=gqa", "--model.n_kv_head=3"], "model.n_kv_head", "must divide n_head 4"),
        (["--model.attn=gqa"], "model.n_kv_head", "gqa needs n_kv_head"),
        (["--model.attn=mqa", "--model.n_kv_head=2"], "model.n_kv_head", "mqa fixes n_kv_head to 1"),
        (["--model.attn=flash"], "model.attn", "unknown attention type 'flash'"),
        (["--model.attn=mla", "--model.mla_rope_dim=7"], "model.mla_rope_dim", "positive even"),
        (["--train.lr=fast"], "train.lr", "expected float"),
        (["--model.n_layer=2.5"], "model.n_layer", "expected int"),
        (["--data.seq_len=512"], "data.seq_len", "model.max_seq_len=256"),
        (["--train.warmup_steps=999"], "train.warmup_steps", "max_steps"),
        (["--strategy.name=fsdp"], "strategy.name", "deepspeed"),
        (["--model.attn_impl=cuda"], "model.attn_impl", "torch, rebuild or triton"),
        (["--model.rope_scaling={rope_type: yarn}"], "model.rope_scaling.rope_type", "only 'llama3'"),
        # checked up front, not when used (a traceback mid-run, or after the whole run for the sample)
        (["--run.sample_tokens=0"], "run.sample_tokens", "must be > 0, got 0"),
        (["--run.sample_prompt="], "run.sample_prompt", "must not be empty"),
        (["--train.precision=bf16-mixd"], "train.precision", "one of .*'bf16-mixed'.*got 'bf16-mixd'"),
        (["--strategy.devices=abc"], "strategy.devices", "auto, a device count >= 1 .*got 'abc'"),
        (["--strategy.devices=0"], "strategy.devices", "got 0"),
        (["--log.every=0"], "log.every", "must be > 0, got 0"),
        (["--train.val_batches=0"], "train.val_batches", "must be > 0, got 0"),
    ],
)
def test_validation_names_key_and_rule(overrides, key, rule):
    with pytest.raises(ConfigError) as err:
        load_config("lrkv_debug.yaml", overrides)
    assert str(err.value).startswith(key) or f"'{key}'" in str(err.value), str(err.value)
    assert re.search(rule, str(err.value)), str(err.value)


@pytest.mark.parametrize("key", ["run.dir", "run.resume", "data.source", "data.tokenizer"])
@pytest.mark.parametrize("value", ["", "'  '"])
def test_empty_paths_are_refused_by_key(key, value):
    """An empty path would silently mean the current folder (train there, scan it for a corpus)."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*empty"):
        load_config("lrkv_debug.yaml", [f"--{key}={value}"])


def test_precisions_are_lightnings_and_device_forms_it_takes_pass():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    lightning = set(typing.get_args(_PRECISION_INPUT_STR)) | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(PRECISIONS) == lightning | {"auto"}
    for devices in ("auto", "2", "'3'", "0,1", "'1,'"):
        load_config("lrkv_debug.yaml", [f"--strategy.devices={devices}"])


def test_malformed_overrides_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="has no value"):
        parse_cli(["--model.rank_k"])
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_cli(["rank_k=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


def _info(*args):
    out = subprocess.run([sys.executable, "-m", "lrkv.info", *args], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return out.stdout


def test_info_json_for_2p5b_configs():
    stats = {name: json.loads(_info("--config", f"{name}_2p5b.yaml", "--json")) for name in ("lrkv", "mha", "gqa", "mla")}
    for s in stats.values():
        assert {"params", "flops_per_token", "kv_bytes_per_token", "kv_bytes_per_token_mha"} <= set(s)
    # Independent arithmetic from docs/lrkv.md §3.1: 2.5B MHA caches 2*18*128 numbers/layer; LRKV 2*128 + 18*(64+48).
    assert stats["mha"]["kv_bytes_per_token"] == 2 * (2 * 18 * 128) * 18
    assert stats["lrkv"]["kv_bytes_per_token"] == 2 * (2 * 128 + 18 * (64 + 48)) * 18
    assert stats["lrkv"]["kv_bytes_per_token"] <= 0.55 * stats["lrkv"]["kv_bytes_per_token_mha"]
    assert stats["mla"]["kv_bytes_per_token"] == 2 * (512 + 64) * 18
    assert stats["gqa"]["kv_bytes_per_token"] == stats["mha"]["kv_bytes_per_token"] // 2
    assert 2.25e9 <= stats["lrkv"]["params"] <= 2.75e9
    assert "KV bytes/token" in _info("--config", "lrkv_debug.yaml")
