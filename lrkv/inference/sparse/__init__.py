"""The sparse decoding engine: one decoder that hosts any token-selection policy (LRQK's low-rank proxy and its
peers) over a CPU row store and a bounded GPU slot pool (docs/lrqk.md, docs/peers.md).

    registry.py  the policies' names, each listed once (torch-free)
    config.py    SparseConfig: the shared budget, the policy and its knobs; presets; the command-line flags
    plan.py      the per-layer stream Geometry; the memory plan (bytes per device, without allocating)
    store.py     what the engine owns: row store, slot pool, host -> device transfers
    policy.py    the Policy base, the LayerView a policy reads, select_top_k
    policies/    one file per policy (lrqk + lowrank.py, exact, streaming, h2o, quest, loki, full)
    engine.py    SparseDecoder (prefill, step, fork), Lockstep, the probe's DecodeStep
"""

import importlib

from lrkv.inference.sparse.config import PRESETS, SparseConfig, add_sparse_args, sparse_config
from lrkv.inference.sparse.registry import POLICIES, policy_class

# these modules import torch: loaded on first use, so a command line builds its flags before torch (--help)
_LAZY = {**dict.fromkeys(("DecodeStep", "Lockstep", "SparseDecoder", "SparseLayer"), "engine"),
         **dict.fromkeys(("MemoryPlan", "MemoryPlanError", "check_fits", "free_host_bytes", "memory_plan",
                          "geometry", "Geometry", "SPARSE_ATTENTION"), "plan"),
         **dict.fromkeys(("LayerView", "Policy", "select_top_k"), "policy")}

__all__ = ["POLICIES", "PRESETS", "DecodeStep", "Geometry", "LayerView", "Lockstep", "MemoryPlan", "MemoryPlanError",
           "Policy", "SPARSE_ATTENTION", "SparseConfig", "SparseDecoder", "SparseLayer", "add_sparse_args",
           "check_fits", "free_host_bytes", "geometry", "memory_plan", "policy_class", "select_top_k",
           "sparse_config"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    return value
