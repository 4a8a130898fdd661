"""Linear probes as batched tensor math: many layers × folds × classes fitted in one optimisation.

Shapes: features ``x`` are ``[L, n, d]`` (L problems that share rows and labels — usually one per
layer), ``train`` masks are ``[F, n]`` (one per fold). Every solver returns weights ``[L, F, d, K]``
and biases ``[L, F, K]`` in the *raw* feature space, so ``x @ w + b`` are the decision scores
(K = 1 for binary problems, as in scikit-learn; K = n_classes otherwise).

The logistic solver minimises scikit-learn's objective exactly (``C · Σ log-loss + ½‖w‖²``, the
intercept unpenalised, optionally on features standardised with each fold's own training
statistics). It is a majorise–minimise Newton method: Böhning's bound ``H ≤ ¼ XᵀX`` (binary) or
``½ XᵀX`` on the zero-sum class subspace (multinomial) gives one fixed matrix per fold, factored
once; each step is then two matrix products and a triangular solve, accelerated with Nesterov
momentum and restarted whenever a step stops descending. Gram matrices of disjoint test folds are
summed into the full one, so k folds cost one pass of ``n · d²`` rather than k.

Numerics: the work happens on globally centred and scaled copies of the features (only for
conditioning — the per-fold penalty is rescaled so the objective is unchanged) and the weights are
mapped back to raw features at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechkit.probing.dual import kernel_logistic

__all__ = ["LinearFit", "fit_logistic", "fit_mean_diff", "fit_ridge", "scores"]


@dataclass(frozen=True, eq=False)
class LinearFit:
    """Weights ``[L, F, d, K]`` and biases ``[L, F, K]`` on raw features; ``n_iter`` per problem."""

    weight: Tensor
    bias: Tensor
    n_iter: Tensor


@dataclass(frozen=True, eq=False)
class _Work:
    """Globally standardised, intercept-augmented features and each fold's penalty scale."""

    xa: Tensor  # [L, n, d+1]; last column is the constant 1
    mean: Tensor  # [L, d]
    scale: Tensor  # [L, d]
    penalty: Tensor  # [L, F, d+1]; 0 on the intercept
    train: Tensor  # [F, n] float


def scores(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Decision scores ``[L, F, n, K]`` of raw features ``x [L, n, d]``."""
    return torch.einsum("lnd,lfdk->lfnk", x, weight) + bias[:, :, None, :]


def _prepare(x: Tensor, train: Tensor, standardize: bool, grams: bool = True) -> tuple[_Work, Tensor | None]:
    """The work space and the training-row Gram matrices ``[L, F, d+1, d+1]`` (which also give
    each fold's feature moments, so standardising per fold costs no extra pass); ``grams=False``
    skips them (the dual solver needs none) and takes the moments directly."""
    mean = x.mean(1)
    xa = x.new_empty(*x.shape[:2], x.shape[2] + 1)
    centred = torch.sub(x, mean[:, None, :], out=xa[..., :-1])
    var = centred.square().mean(1)  # (torch.var_mean over dim 1 is several times slower here)
    scale = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    centred.div_(scale[:, None, :])
    xa[..., -1] = 1
    m = train.to(x.dtype)
    gram = _grams(xa, m) if grams else None
    if standardize:  # scikit-learn's StandardScaler on each fold's training rows (ddof=0)
        if gram is None:
            fold_var = _fold_moments(xa[..., :-1], m)[1]
        else:
            count = m.sum(1)[None, :, None]
            fold_mean = gram[..., :-1, -1] / count
            fold_var = (torch.diagonal(gram, dim1=-2, dim2=-1)[..., :-1] / count - fold_mean.pow(2)).clamp_min(0)
        # w on fold-standardised features = w_work · σ_fold/σ_global, hence this penalty scale
        constant = fold_var <= 1e-10  # StandardScaler leaves constant features unscaled
        penalty = torch.where(constant, scale.pow(-2)[:, None, :], fold_var)
    else:
        penalty = scale.pow(-2)[:, None, :].expand(-1, train.shape[0], -1)
    penalty = torch.cat([penalty, torch.zeros_like(penalty[..., :1])], -1)
    return _Work(xa, mean, scale, penalty, m), gram


def _restrict(x: Tensor, y: Tensor, train: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """With one hold-out split only its training rows enter the fit: drop the others up front."""
    if train.shape[0] != 1 or bool(train.all()):
        return x, y, train
    rows = torch.nonzero(train[0], as_tuple=True)[0]
    return x.index_select(1, rows), y[rows], torch.ones(1, len(rows), dtype=torch.bool)


def _fold_moments(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance (ddof=0) of ``x [L, n, d]`` over each fold's rows ``m [F, n]``."""
    count = m.sum(1)[None, :, None]
    mean = torch.einsum("fn,lnd->lfd", m, x) / count
    return mean, (torch.einsum("fn,lnd->lfd", m, x.pow(2)) / count - mean.pow(2)).clamp_min(0)


def _grams(xa: Tensor, train: Tensor) -> Tensor:
    """Training-row Gram matrices ``[L, F, d+1, d+1]``; disjoint test folds share one pass."""
    test = 1.0 - train
    if train.shape[0] > 1 and bool((test.sum(0) == 1).all()):
        parts = [_gram(xa, torch.nonzero(t, as_tuple=True)[0]) for t in test]
        full = torch.stack(parts).sum(0)
        return torch.stack([full - p for p in parts], 1)
    return torch.stack([_gram(xa, torch.nonzero(t, as_tuple=True)[0]) for t in train], 1)


def _gram(xa: Tensor, rows: Tensor) -> Tensor:
    sub = xa.index_select(1, rows)
    return sub.transpose(1, 2) @ sub


def _to_raw(work: _Work, w: Tensor) -> tuple[Tensor, Tensor]:
    """Map weights ``[L, F, d+1, K]`` on standardised features back to raw ones."""
    coef = w[:, :, :-1, :] / work.scale[:, None, :, None]
    bias = w[:, :, -1, :] - torch.einsum("ld,lfdk->lfk", work.mean, coef)
    return coef, bias


def fit_logistic(x: Tensor, y: Tensor, train: Tensor, *, n_classes: int, C: float = 1.0,
                 standardize: bool = True, max_iter: int = 500, tol: float = 1e-4) -> LinearFit:
    """L2 logistic regression (binary or multinomial), scikit-learn's objective, all problems at once.

    ``y`` holds class indices ``0..n_classes-1``; ``tol`` bounds each problem's gradient
    (max-norm, per training row) at convergence, as scikit-learn's lbfgs does.
    """
    x, y, train = _restrict(x, y, train)
    binary = n_classes == 2
    dual = binary and int(train.sum(1).max()) < x.shape[-1]  # fewer rows than features: Newton in the dual
    work, grams = _prepare(x, train, standardize, grams=not dual)
    k = 1 if binary else n_classes
    targets = (y[:, None].float() if binary else torch.nn.functional.one_hot(y, k).float()).to(x.dtype)
    if dual:
        w, n_iter = kernel_logistic(work.xa[..., :-1], work.train, work.penalty[..., :-1], y, C=C,
                                    max_iter=max_iter, tol=tol)
        return LinearFit(*_to_raw(work, w), n_iter)
    bound = 0.25 if binary else 0.5
    ridge = torch.diag_embed(work.penalty)
    ridge[..., -1, -1] = 1e-6 * work.train.sum(1)[None, :]  # the intercept is unpenalised; keep P definite
    factor = torch.linalg.cholesky(bound * C * grams + ridge)
    return _nesterov_mm(work, targets, factor, C, binary, max_iter, tol)


def _gradient(work: _Work, w: Tensor, targets: Tensor, C: float, binary: bool) -> Tensor:
    """Gradient ``[L, F, d+1, K]`` of C·Σ loss + ½ w·penalty·w over each fold's training rows."""
    L, F, d1, K = w.shape
    z = (work.xa @ w.permute(0, 2, 1, 3).reshape(L, d1, F * K)).view(L, -1, F, K)
    p = torch.sigmoid(z) if binary else torch.softmax(z, -1)
    residual = (p - targets[None, :, None, :]) * work.train.T[None, :, :, None]
    g = (work.xa.transpose(1, 2) @ residual.reshape(L, -1, F * K)).view(L, d1, F, K).permute(0, 2, 1, 3)
    g = C * g + work.penalty[..., None] * w
    if not binary:  # stay on the zero-sum subspace where the bound holds (softmax is shift-invariant)
        g = g - g.mean(-1, keepdim=True)
    return g


def _nesterov_mm(work: _Work, targets: Tensor, factor: Tensor, C: float, binary: bool, max_iter: int,
                 tol: float) -> LinearFit:
    L, F, d1 = factor.shape[0], factor.shape[1], factor.shape[-1]
    k = targets.shape[1]
    w = work.xa.new_zeros(L, F, d1, k)
    v, t = w.clone(), work.xa.new_ones(L, F)
    n_iter = torch.zeros(L, F, dtype=torch.long)
    done = torch.zeros(L, F, dtype=torch.bool)
    rows = work.train.sum(1)[None, :]
    for _ in range(max_iter):
        g = _gradient(work, v, targets, C, binary)
        done = done | (g.abs().amax((-2, -1)) / rows < tol)
        if bool(done.all()):
            break
        n_iter += (~done).long()
        w_new = v - torch.cholesky_solve(g, factor)
        restart = ((g * (w_new - w)).sum((-2, -1)) > 0) & ~done
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = ((t - 1) / t_next)[..., None, None]
        keep = (done | restart)[..., None, None]
        w_next = torch.where(keep, torch.where(restart[..., None, None], w, v), w_new)
        v = torch.where(keep, w_next, w_new + momentum * (w_new - w))
        t = torch.where(restart | done, torch.ones_like(t), t_next)
        w = w_next
    coef, bias = _to_raw(work, v)
    return LinearFit(coef, bias, n_iter)


def fit_ridge(x: Tensor, y: Tensor, train: Tensor, *, n_classes: int, alpha: float = 1.0,
              standardize: bool = True) -> LinearFit:
    """Ridge classification as scikit-learn's ``RidgeClassifier``: targets ±1, one column per class
    (a single column for two classes), intercept unpenalised; one Cholesky solve per problem."""
    x, y, train = _restrict(x, y, train)
    work, grams = _prepare(x, train, standardize)
    k = 1 if n_classes == 2 else n_classes
    targets = (2.0 * y[:, None].float() - 1 if k == 1 else
               2.0 * torch.nn.functional.one_hot(y, k).float() - 1).to(x.dtype)
    ridge = torch.diag_embed(alpha * work.penalty)
    weighted = targets[:, None, :] * work.train.T[:, :, None]  # [n, F, K]
    rhs = torch.einsum("lnd,nfk->lfdk", work.xa, weighted)
    w = torch.linalg.solve(grams + ridge, rhs)
    coef, bias = _to_raw(work, w)
    return LinearFit(coef, bias, torch.ones(w.shape[:2], dtype=torch.long))


def fit_mean_diff(x: Tensor, y: Tensor, train: Tensor, *, n_classes: int, standardize: bool = False) -> LinearFit:
    """Difference of class means (binary: ``w = μ₁ − μ₀``, threshold halfway) or nearest centroid
    (``w_k = μ_k``, ``b_k = −½‖μ_k‖²``), on each fold's training rows (standardised with the fold's
    own statistics when ``standardize``)."""
    x, y, train = _restrict(x, y, train)
    m = train.to(x.dtype)
    centre = x.mean(1, keepdim=True)  # for precision only; it cancels below
    xc = x - centre
    if standardize:
        shift, var = _fold_moments(xc, m)
        spread = torch.where(var > 1e-10 * var.amax(-1, keepdim=True).clamp_min(1e-30), var.sqrt(),
                             torch.ones_like(var))
    else:
        shift, spread = torch.zeros_like(xc[:, :1]).expand(-1, m.shape[0], -1), torch.ones_like(xc[:, :1])
    members = m[:, :, None] * torch.nn.functional.one_hot(y, n_classes).to(x.dtype)[None]  # [F, n, C]
    means = torch.einsum("lnd,fnc->lfcd", xc, members) / members.sum(1)[None, :, :, None]
    u = (means - shift[:, :, None, :]) / spread[:, :, None, :]
    if n_classes == 2:
        w = (u[:, :, 1] - u[:, :, 0])[..., None]  # [L, F, d, 1]
        b = -(w[..., 0] * (u[:, :, 1] + u[:, :, 0]) / 2).sum(-1, keepdim=True)
    else:
        w, b = u.transpose(-1, -2), -0.5 * u.pow(2).sum(-1)
    coef = w / spread[..., None]
    bias = b - torch.einsum("lfd,lfdk->lfk", shift + centre, coef)
    return LinearFit(coef, bias, torch.ones(w.shape[:2], dtype=torch.long))
