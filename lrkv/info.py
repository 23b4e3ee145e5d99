"""python -m lrkv.info --config X [--json] [overrides]: parameters, FLOPs/token and KV bytes/token of a config.

The model is built on the meta device, so a 2.5B config costs no memory.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from lrkv.config import Config, ConfigError, ModelConfig, parse_cli


def mha_equivalent(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, attn="mha", n_kv_head=None)


def model_stats(cfg: Config) -> dict:
    import torch  # here, not at the top: --help and config errors answer before torch loads

    from lrkv.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
        mha = Transformer(mha_equivalent(cfg.model))
    kv, kv_mha = model.kv_bytes_per_token(), mha.kv_bytes_per_token()
    return {
        "attn": cfg.model.attn,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "attn_params_per_layer": sum(p.numel() for p in model.layers[0].attn.parameters()),
        "seq_len": cfg.data.seq_len,
        "flops_per_token": model.num_flops_per_token(cfg.data.seq_len),
        "kv_bytes_per_token": kv,
        "kv_bytes_per_token_mha": kv_mha,
        "kv_fraction_of_mha": kv / kv_mha,
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    if as_json:
        argv.remove("--json")
    try:
        cfg = parse_cli(argv, "python -m lrkv.info --config FILE [--json] [--section.key=value ...]",
                        __doc__.split("\n\n")[1].strip(), "  --json          one JSON object instead of the table")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    stats = model_stats(cfg)
    if as_json:
        print(json.dumps(stats))
        return
    print(f"attention             {stats['attn']}")
    print(f"parameters            {stats['params']:,} ({stats['params'] / 1e9:.3f} B; non-embedding {stats['params_non_embedding']:,})")
    print(f"attention params/layer {stats['attn_params_per_layer']:,}")
    print(f"FLOPs/token (T={stats['seq_len']})  {stats['flops_per_token']:.4e}  (fwd+bwd, 6N + attention core)")
    print(f"KV bytes/token (bf16) {stats['kv_bytes_per_token']:,}  = {100 * stats['kv_fraction_of_mha']:.1f}% of MHA's "
          f"{stats['kv_bytes_per_token_mha']:,}")


if __name__ == "__main__":
    main()
