"""The selection policies the sparse engine hosts, each named once here: name -> (class, one-line summary).

Policy `name` lives in `policies/<name>.py` as that class, with its own settings as the nested dataclass
`Class.Knobs`. Adding a policy is one file there and one line here; every command line, `eval.ruler` and the memory
plan take the names from this dict. Imports no torch (parsers list the names before --help is answered);
`policy_class` imports the policy's file on first use.
"""

from __future__ import annotations

import importlib

POLICIES: dict[str, tuple[str, str]] = {
    "lrqk": ("LRQK", "LRQK's rank-r low-rank proxy q̂ . A_K (Li et al. 2025)"),
    "exact": ("Exact", "oracle: true q . k over every stored key (an upper bound; saves nothing)"),
    "streaming": ("Streaming", "StreamingLLM: sinks + the newest tokens"),
    "h2o": ("H2O", "H2O: heavy hitters by accumulated attention, evicting"),
    "quest": ("Quest", "Quest: pages ranked by a bound from their post-RoPE key min/max"),
    "loki": ("Loki", "Loki: q . k on the keys' top-r principal directions"),
    "shadowkv": ("ShadowKV", "ShadowKV selection (exact keys): chunks ranked by their mean key, outlier chunks kept"),
    "full": ("Full", "every stored row selected: exact attention through the engine"),
}


def policy_class(name: str) -> type:
    """The Policy subclass registered as `name` (its settings: `.Knobs`)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}', expected one of {', '.join(POLICIES)}")
    module = importlib.import_module(f"lrkv.inference.sparse.policies.{name}")
    return getattr(module, POLICIES[name][0])
