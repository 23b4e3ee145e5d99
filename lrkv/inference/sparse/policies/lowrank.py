"""LRQK's low-rank algebra (docs/lrqk.md §1-2): the prefill ALS fit of A_Q, A_K, B_Q, B_K, the per-token q̂/k̂
solve and the Kaczmarz basis updates. Pure functions on fp32 tensors."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _ridge(m: torch.Tensor) -> torch.Tensor:
    """m + eps I with eps = 1e-6 trace(m)/r (docs/lrqk.md §8.4) and a tiny floor for all-zero systems."""
    r = m.shape[-1]
    eps = 1e-6 * m.diagonal(dim1=-2, dim2=-1).sum(-1) / r + 1e-20
    return m + eps[..., None, None] * torch.eye(r, dtype=m.dtype, device=m.device)


def _solve_right(rhs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """X with X m = rhs for symmetric r x r systems m (batched). Through the r x r inverse: one l x r output and no
    transposed copies of the tall rhs (a right-hand solve transposes it, 2 extra l x r buffers at prefill)."""
    return rhs @ torch.linalg.inv(_ridge(m))


def _least_squares(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_B ||y - a B||: (a^T a)^-1 a^T y."""
    return torch.linalg.solve(_ridge(a.mT @ a), a.mT @ y)


class Factors(NamedTuple):
    a_q: torch.Tensor  # (N, h, l, r)
    a_k: torch.Tensor  # (N, l, r), shared by the h query heads of a proxy
    b_q: torch.Tensor  # (N, h, r, D)
    b_k: torch.Tensor  # (N, r, D)


def als_factorize(q: torch.Tensor, k: torch.Tensor, k_rec: torch.Tensor, rank: int, iters: int, tol: float,
                  generator: torch.Generator) -> Factors:
    """docs/lrqk.md §1 ALS (lambda = 1, Gauss-Seidel) for N independent problems with h query heads sharing A_K:

        min sum_h 1/2 ||Q_h K_h^T - A_Qh A_K^T||^2 + 1/2 ||Q_h - A_Qh B_Qh||^2 + 1/2 ||K_rec - A_K B_K||^2

    q: (N, h, l, D), k: (N, h or 1, l, D) fp32 (post-RoPE queries and the true keys of each head, or one key shared
    by the h heads: GQA's group); k_rec: (N, l, D). With h = 1 and k_rec = K this is the reference; Q K^T is never
    formed. Padding rows must be zero in q, k, k_rec.
    """
    n, h, l, _ = q.shape
    a_q = torch.randn(n, h, l, rank, generator=generator, device=q.device)
    a_k = torch.randn(n, l, rank, generator=generator, device=q.device)
    for _ in range(iters):
        b_q, b_k = _least_squares(a_q, q), _least_squares(a_k, k_rec)
        kta = k.mT @ a_k[:, None]  # (N, h or 1, D, r)
        new_q = _solve_right(q @ (kta + b_q.mT), (a_k.mT @ a_k)[:, None] + b_q @ b_q.mT)
        qa = q.mT @ new_q  # (N, h, D, r)
        rhs = ((k @ qa).sum(1) if k.shape[1] > 1 else k[:, 0] @ qa.sum(1)) + k_rec @ b_k.mT
        new_k = _solve_right(rhs, (new_q.mT @ new_q).sum(1) + b_k @ b_k.mT)
        delta = max(F.mse_loss(new_q, a_q).item(), F.mse_loss(new_k, a_k).item())
        a_q, a_k = new_q, new_k
        if delta < tol:
            break
    return Factors(a_q, a_k, _least_squares(a_q, q), _least_squares(a_k, k_rec))


def als_objective(q: torch.Tensor, k: torch.Tensor, k_rec: torch.Tensor, f: Factors) -> torch.Tensor:
    """The ALS objective per problem (N,), forming Q K^T explicitly (for tests on small l)."""
    scores = (q @ k.mT - f.a_q @ f.a_k[:, None].mT).square().sum((1, 2, 3))  # k (N, 1, ...) broadcasts
    rec_q = (q - f.a_q @ f.b_q).square().sum((1, 2, 3))
    rec_k = (k_rec - f.a_k @ f.b_k).square().sum((1, 2))
    return 0.5 * (scores + rec_q + rec_k)


def decode_solve(q: torch.Tensor, s_self: torch.Tensor, k_rec: torch.Tensor, s_omega: torch.Tensor,
                 a_omega: torch.Tensor, b_q: torch.Tensor, b_k: torch.Tensor, iters: int, tol: float):
    """docs/lrqk.md §2 step 2 with h heads sharing k̂ (lambda1 = lambda2 = 1). q (N, h, D); s_self (N, h) = q_h . k_h,t;
    k_rec (N, D); s_omega (N, h, C) exact scores on resident tokens, a_omega (N, C, r) their A_K rows (zero rows
    for empty slots). Returns q̂ (N, h, r), k̂ (N, r)."""
    k_base, mk_base = k_rec[:, None] @ b_k.mT, b_k @ b_k.mT
    k_hat = _solve_right(k_base, mk_base)  # (N, 1, r)
    q_base = torch.einsum("nhd,nhrd->nhr", q, b_q) + s_omega @ a_omega
    m_base = b_q @ b_q.mT + (a_omega.mT @ a_omega)[:, None]
    # the early stop (k̂ moved less than tol) is a device flag that freezes the iterates: no host sync per step
    running, q_hat = torch.ones((), dtype=torch.bool, device=q.device), None
    for _ in range(iters):
        rhs = q_base + s_self[..., None] * k_hat
        new_q = _solve_right(rhs[..., None, :], m_base + (k_hat.mT @ k_hat)[:, None])[..., 0, :]
        rhs_k = k_base + (s_self[..., None] * new_q).sum(1, keepdim=True)
        new_k = _solve_right(rhs_k, mk_base + new_q.mT @ new_q)
        q_hat = new_q if q_hat is None else torch.where(running, new_q, q_hat)
        moved = F.mse_loss(new_k, k_hat)
        k_hat = torch.where(running, new_k, k_hat)
        running = running & (moved >= tol)
    return q_hat, k_hat[:, 0]


def kaczmarz(b: torch.Tensor, x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact line-search step on 1/2||x̂ B - x||^2 (docs/lrqk.md §2 step 3): afterwards x̂ B = x exactly.
    b (..., r, D), x_hat (..., r), target (..., D)."""
    resid = (x_hat[..., None, :] @ b)[..., 0, :] - target
    norm = x_hat.square().sum(-1).clamp_min(torch.finfo(x_hat.dtype).tiny)
    return b - x_hat[..., :, None] * resid[..., None, :] / norm[..., None, None]
