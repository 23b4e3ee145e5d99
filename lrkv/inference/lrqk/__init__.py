"""LRQK hybrid GPU-CPU decoder (docs/lrqk.md) and its token-selection policies.

    config.py    LRQKConfig: budget, policy, proxy knobs; presets
    lowrank.py   the ALS prefill fit, the per-token q̂/k̂ solve, Kaczmarz updates (pure functions)
    policies.py  which top_k tokens to attend: lrqk, exact, streaming, h2o, quest, loki
    plan.py      the memory plan (bytes per device, computed without allocating) and the fit check
    decoder.py   the per-layer store/pool glue (the model's LayerCache), prefill/step, forks from one prefill,
                 the evaluation probe (DecodeStep)
"""

from lrkv.inference.lrqk.config import POLICIES, PRESETS, LRQKConfig
from lrkv.inference.lrqk.decoder import DecodeStep, Lockstep, LRQKDecoder, LRQKLayer
from lrkv.inference.lrqk.lowrank import Factors, als_factorize, als_objective, decode_solve, kaczmarz
from lrkv.inference.lrqk.plan import MemoryPlan, MemoryPlanError, check_fits, free_host_bytes, memory_plan
from lrkv.inference.lrqk.policies import select_top_k

__all__ = ["POLICIES", "PRESETS", "DecodeStep", "Factors", "Lockstep", "LRQKConfig", "LRQKDecoder", "LRQKLayer",
           "MemoryPlan", "MemoryPlanError", "als_factorize", "als_objective", "check_fits", "decode_solve",
           "free_host_bytes", "kaczmarz", "memory_plan", "select_top_k"]
