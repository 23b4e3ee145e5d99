"""LRQK hybrid GPU-CPU decoder (docs/lrqk.md) and its token-selection policies.

    config.py    LRQKConfig: budget, policy, proxy knobs; presets; the command-line flags (add_lrqk_args, lrqk_config)
    lowrank.py   the ALS prefill fit, the per-token q̂/k̂ solve, Kaczmarz updates (pure functions)
    policies.py  which top_k tokens to attend: lrqk, exact, streaming, h2o, quest, loki
    plan.py      the memory plan (bytes per device, computed without allocating) and the fit check
    decoder.py   the per-layer store/pool glue (the model's LayerCache), prefill/step, forks from one prefill,
                 the evaluation probe (DecodeStep)
"""

import importlib

from lrkv.inference.lrqk.config import POLICIES, PRESETS, LRQKConfig, add_lrqk_args, lrqk_config

# these modules import torch: loaded on first use, so a command line builds its LRQK flags before torch (--help)
_LAZY = {**dict.fromkeys(("DecodeStep", "Lockstep", "LRQKDecoder", "LRQKLayer"), "decoder"),
         **dict.fromkeys(("Factors", "als_factorize", "als_objective", "decode_solve", "kaczmarz"), "lowrank"),
         **dict.fromkeys(("MemoryPlan", "MemoryPlanError", "check_fits", "free_host_bytes", "memory_plan"), "plan"),
         "select_top_k": "policies"}

__all__ = ["POLICIES", "PRESETS", "DecodeStep", "Factors", "Lockstep", "LRQKConfig", "LRQKDecoder", "LRQKLayer",
           "MemoryPlan", "MemoryPlanError", "add_lrqk_args", "als_factorize", "als_objective", "check_fits",
           "decode_solve", "free_host_bytes", "kaczmarz", "lrqk_config", "memory_plan", "select_top_k"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    return value
