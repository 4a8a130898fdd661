"""Binary L2 logistic regression in the dual (kernel) form, for problems with fewer rows than features.

With fewer training rows than features (a few hundred sentences, d = 576 … 4096) the data are often
separable: the majorise–minimise bound of :mod:`functional` grows loose as probabilities saturate
and first-order methods crawl. Newton's method converges in a handful of steps, and by the
representer theorem ``w = Xᵀα`` its system has the size of the rows, not of the features:

    minimise  C Σ_i m_i ℓ(z_i, y_i) + ½ αᵀKα,   z = Kα + b,   K = X P⁻¹ Xᵀ

(``m`` the fold's training mask, ``P`` its diagonal penalty scale). Rows outside the fold keep
α = 0. Each step solves an ``(n+1)``-square system per problem, with a backtracking line search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor


def kernel_logistic(xs: Tensor, train: Tensor, penalty: Tensor, y: Tensor, *, C: float, max_iter: int,
                    tol: float) -> tuple[Tensor, Tensor]:
    """Weights ``[L, F, d+1, 1]`` (intercept last) on the features ``xs [L, n, d]`` and step counts ``[L, F]``.

    ``train [F, n]`` (float), ``penalty [L, F, d]`` (positive), ``y [n]`` in {0, 1}.
    """
    xf, m, yf = _fold_rows(xs, train, y)  # [L, F, r, d], [F, r], [F, r]: each fold's training rows only
    inv = penalty.reciprocal()
    scaled = xf * inv[:, :, None, :]
    kernel = scaled @ xf.transpose(-1, -2)  # [L, F, r, r]
    L, F, n = kernel.shape[:3]
    alpha, b = xs.new_zeros(L, F, n), xs.new_zeros(L, F)
    m = m[None]
    rows = train.sum(1)[None]
    n_iter = torch.zeros(L, F, dtype=torch.long)
    done = torch.zeros(L, F, dtype=torch.bool)
    for _ in range(max_iter):
        z = (kernel @ alpha[..., None])[..., 0] + b[..., None]
        p = torch.sigmoid(z)
        v = C * m * (p - yf) + alpha  # the primal gradient is Xᵀv (features) and C·Σ m(p−y) (intercept)
        g_w = (xf.transpose(-1, -2) @ v[..., None])[..., 0] * inv.sqrt()
        g_b = C * (m * (p - yf)).sum(-1)
        done = done | (torch.maximum(g_w.abs().amax(-1), g_b.abs()) / rows < tol)
        if bool(done.all()):
            break
        n_iter += (~done).long()
        d_alpha, d_b = _newton_direction(kernel, C * m * p * (1 - p), v, g_b)
        step = _line_search(kernel, alpha, b, d_alpha, d_b, yf, m, C)
        step = torch.where(done, torch.zeros_like(step), step)
        alpha, b = alpha - step[..., None] * d_alpha, b - step * d_b
    w = (scaled.transpose(-1, -2) @ alpha[..., None])[..., 0]  # P⁻¹ Xᵀ α
    return torch.cat([w, b[..., None]], -1)[..., None], n_iter


def _fold_rows(xs: Tensor, train: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each fold's training rows, padded to the largest fold with masked (weight 0) repeats."""
    counts = train.sum(1).long()
    r = int(counts.max())
    index = torch.zeros(train.shape[0], r, dtype=torch.long)
    mask = torch.zeros(train.shape[0], r, dtype=xs.dtype)
    for f, row in enumerate(train.bool()):
        picked = torch.nonzero(row, as_tuple=True)[0]
        index[f, : len(picked)] = picked
        mask[f, : len(picked)] = 1
    return xs[:, index], mask, y.to(xs.dtype)[index]


def _newton_direction(kernel: Tensor, weights: Tensor, v: Tensor, g_b: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``[[W K + I, W 1], [1ᵀ W K, 1ᵀ W 1]] [Δα; Δb] = [v; g_b]`` (``W = C·m·s``), the Newton
    system with the common factor K taken out of the α rows."""
    L, F, n = weights.shape
    a = kernel.new_zeros(L, F, n + 1, n + 1)
    wk = weights[..., None] * kernel
    a[..., :n, :n] = wk + torch.eye(n, dtype=kernel.dtype)
    a[..., :n, n] = weights
    a[..., n, :n] = wk.sum(-2)
    a[..., n, n] = weights.sum(-1)
    sol = torch.linalg.solve(a, torch.cat([v, g_b[..., None]], -1))
    return sol[..., :n], sol[..., n]


def _objective(kernel: Tensor, alpha: Tensor, b: Tensor, yf: Tensor, m: Tensor, C: float) -> Tensor:
    k_alpha = (kernel @ alpha[..., None])[..., 0]
    z = k_alpha + b[..., None]
    loss = (m * (nnf.softplus(z) - yf * z)).sum(-1)
    return C * loss + 0.5 * (alpha * k_alpha).sum(-1)


def _line_search(kernel: Tensor, alpha: Tensor, b: Tensor, d_alpha: Tensor, d_b: Tensor, yf: Tensor, m: Tensor,
                 C: float) -> Tensor:
    """Largest step in 1, ½, ¼, … that does not raise each problem's objective."""
    now = _objective(kernel, alpha, b, yf, m, C)
    step = torch.ones_like(b)
    accepted = torch.zeros_like(b, dtype=torch.bool)
    for _ in range(12):  # a step of 1/4096 that still raises the objective means it has converged
        trial = _objective(kernel, alpha - step[..., None] * d_alpha, b - step * d_b, yf, m, C)
        accepted = accepted | (trial <= now + 1e-7 * now.abs())
        if bool(accepted.all()):
            break
        step = torch.where(accepted, step, step / 2)
    return torch.where(accepted, step, torch.zeros_like(step))
