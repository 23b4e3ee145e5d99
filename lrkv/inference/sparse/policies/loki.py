"""loki: Loki (Singhania et al. 2024, arXiv 2406.02542), keys projected on their top-r principal directions, score
(q P_r) . (k_j P_r), with P_r the eigenvectors of K^T K of the largest eigenvalues. The basis comes from
- a file (`basis` = its path), fitted once per model on calibration text by `fit_basis`, as the paper does
  offline; or
- this prompt's own keys at prefill (`basis="prompt"`): an oracle basis that has seen the keys it ranks.
Uncentred: a common shift c of the keys adds the same q . c to every candidate, so top-k ignores it (centring moved
recall by <= 0.005 on SmolLM2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lrkv.inference.sparse.plan import Geometry
from lrkv.inference.sparse.policy import Policy
from lrkv.inference.sparse.store import grown


class Loki(Policy):
    @dataclass(frozen=True)
    class Knobs:
        rank: int = 32  # principal directions kept
        basis: str = "prompt"  # "prompt", or the path of a basis file written by fit_basis

        def problems(self, head_dim: int) -> list[str]:
            rules = [(1 <= self.rank <= head_dim, f"rank must be in [1, head_dim={head_dim}], got {self.rank}"),
                     (self.basis == "prompt" or Path(self.basis).is_file(),
                      f"basis must be 'prompt' or a basis file (python -m eval.ruler fits one), got '{self.basis}'")]
            return [message for ok, message in rules if not ok]

    def __init__(self, view, knobs, capacity):
        super().__init__(view, knobs, capacity)
        S, m = view.geo.pool, view.geo.key_heads
        self.k_low = torch.zeros(S, m, capacity, knobs.rank, dtype=view.dtype, device=view.device)
        self.basis = None  # (S, m, D, r) fp32, set at prefill

    @staticmethod
    def state_bytes(knobs, g: Geometry, length: int, head_dim: int, elt: int) -> int:
        # rank-r projected keys (model dtype) and the D x r basis (fp32) per stream and head
        return g.pool * g.key_heads * (length * knobs.rank * elt + 4 * head_dim * knobs.rank)

    def grow(self, capacity):
        self.k_low = grown(self.k_low, capacity, 0.0, dim=2)

    def prefill(self, q, k, kv, keep):
        T = k.shape[2]  # one basis per key head, then shared by the query heads that read it
        ks = k.float() if keep is None else k.float() * keep[:, None, :, None]
        if self.knobs.basis == "prompt":
            vecs = principal_directions(ks.mT @ ks)
        else:  # (key heads, D, D) from the file, the same for every batch row
            vecs = _basis_file(self.knobs.basis).get(f"layer.{self.view.layer}")
            if vecs is None or vecs.shape != (k.shape[1], k.shape[3], k.shape[3]):
                raise ValueError(f"{self.knobs.basis}: no layer.{self.view.layer} basis of shape "
                                 f"{(k.shape[1], k.shape[3], k.shape[3])} (fitted for another model?)")
            vecs = vecs.to(ks.device).expand(len(ks), -1, -1, -1)
        basis = vecs[..., : self.knobs.rank]
        self.basis = self.view.geo.key_streams(basis)
        self.k_low[:, :, :T] = self.view.geo.key_streams((ks @ basis).to(self.k_low.dtype))
        return self._scores(q[:, :, -1], T)

    def step(self, q, k_t, kv, t):
        k_low = self.view.geo.streams(k_t[:, :, 0].float())[:, :, None] @ self.basis
        self.k_low[:, :, t] = k_low[:, :, 0].to(self.k_low.dtype)
        return self._scores(q[:, :, 0], t + 1)

    def _scores(self, q, length: int) -> torch.Tensor:
        q_low = self.view.geo.streams(q.float())[:, :, None] @ self.basis  # (S, m, 1, r)
        return (q_low @ self.k_low[:, :, :length].float().mT)[:, :, 0]


def principal_directions(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric (..., D, D) matrices as columns, largest eigenvalue first."""
    return torch.linalg.eigh(gram)[1].flip(-1)


@functools.lru_cache(maxsize=4)
def _basis_file(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def fit_basis(model, windows: list[torch.Tensor], path: str | Path) -> Path:
    """Loki's offline basis for `model`: per layer and key head, the principal directions of the post-RoPE keys of
    the calibration `windows` (token id tensors, each prefilled on its own), written to `path` (safetensors,
    `layer.i`: (key heads, D, D)). The file appears complete or not at all."""
    from lrkv.atomic import atomic_write
    from lrkv.inference.sparse.config import SparseConfig
    from lrkv.inference.sparse.engine import SparseDecoder

    grams: list[torch.Tensor | float] = [0.0] * len(model.layers)
    with torch.inference_mode():
        for ids in windows:
            dec = SparseDecoder(model, SparseConfig(policy="streaming", top_k=1, recent=1))
            dec.prefill(ids[None], logits_to_keep=1)
            for i, layer in enumerate(dec.state.layers):
                k = layer.view.stored_keys_values(ids.numel())[0][0].float()  # (key heads, T, D)
                grams[i] = grams[i] + k.mT @ k
    tensors = {f"layer.{i}": principal_directions(g).contiguous() for i, g in enumerate(grams)}
    path = Path(path)
    atomic_write(path, lambda f: f.write(save(tensors)), sum(t.numel() * 4 for t in tensors.values()))
    return path
