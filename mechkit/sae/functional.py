"""SAE evaluation as pure tensor math: sparsity, reconstruction quality, latent usage and the
model-level figures (CE-loss recovered, KL) computed from losses and logits the caller supplies.

Shapes: activations ``x`` and reconstructions ``x_hat`` are ``[..., d]`` (every leading index is a
token), latents are ``[..., d_sae]``, firing frequencies are ``[d_sae]`` in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mechkit.errors import MechkitError

__all__ = [
    "ce_loss_recovered",
    "cosine",
    "dead_fraction",
    "dense_fraction",
    "explained_variance",
    "firing_frequency",
    "fvu",
    "kl_divergence",
    "l0",
]


def _tokens(t: Tensor, what: str) -> Tensor:
    """``t`` as ``[n, d]`` rows, refused when empty or not finite."""
    if not isinstance(t, Tensor):
        raise MechkitError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.dim() < 1 or t.numel() == 0:
        raise MechkitError(f"{what} is empty (shape {tuple(t.shape)}); pass at least one token")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise MechkitError(f"{what} contains NaN or infinite values")
    return t.reshape(-1, t.shape[-1])


def _pair(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(x_hat, Tensor) or x.shape != x_hat.shape:
        got = tuple(x_hat.shape) if isinstance(x_hat, Tensor) else type(x_hat).__name__
        raise MechkitError(f"reconstruction has shape {got} but the activations have {tuple(x.shape)}")
    return _tokens(x, "activations").double(), _tokens(x_hat, "reconstruction").double()


def l0(latents: Tensor, threshold: float = 0.0) -> float:
    """Mean number of latents per token whose value exceeds ``threshold`` (in absolute value)."""
    z = _tokens(latents, "latents")
    return float((z.abs() > threshold).sum(-1).double().mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over all tokens
    (the mean is taken per dimension over tokens). 0 for a perfect reconstruction, 1 for the mean."""
    x, x_hat = _pair(x, x_hat)
    total = (x - x.mean(0)).square().sum()
    if total <= 0:
        raise MechkitError("the activations have zero variance: FVU is undefined (pass more than one distinct token)")
    return float((x - x_hat).square().sum() / total)


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """``1 − FVU``."""
    return 1.0 - fvu(x, x_hat)


def cosine(x: Tensor, x_hat: Tensor, eps: float = 1e-12) -> float:
    """Mean over tokens of the cosine similarity between ``x`` and ``x̂``."""
    x, x_hat = _pair(x, x_hat)
    num = (x * x_hat).sum(-1)
    den = (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(eps)
    return float((num / den).mean())


def firing_frequency(batches: Iterable[Tensor], threshold: float = 0.0) -> Tensor:
    """Fraction of tokens on which each latent is active (``|z| > threshold``), over a stream of
    latent batches ``[..., d_sae]``; returns ``[d_sae]`` float64."""
    counts: Tensor | None = None
    n = 0
    for batch in batches:
        z = _tokens(batch, "latent batch")
        if counts is None:
            counts = torch.zeros(z.shape[-1], dtype=torch.float64)
        elif z.shape[-1] != counts.shape[0]:
            raise MechkitError(f"latent batch has {z.shape[-1]} latents, earlier batches had {counts.shape[0]}")
        counts += (z.abs() > threshold).sum(0).to(torch.float64)
        n += z.shape[0]
    if counts is None:
        raise MechkitError("no latent batches given: firing frequency needs at least one token")
    return counts / n


def _frequencies(freq: Tensor) -> Tensor:
    if not isinstance(freq, Tensor) or freq.dim() != 1 or freq.numel() == 0:
        raise MechkitError("firing frequencies must be a non-empty 1-d tensor [d_sae]")
    if not torch.isfinite(freq).all() or (freq < 0).any() or (freq > 1).any():
        raise MechkitError("firing frequencies must be finite and in [0, 1]")
    return freq


def dead_fraction(freq: Tensor, threshold: float = 0.0) -> float:
    """Fraction of latents whose firing frequency is at most ``threshold`` (0: never active)."""
    return float((_frequencies(freq) <= threshold).double().mean())


def dense_fraction(freq: Tensor, threshold: float = 0.1) -> float:
    """Fraction of latents active on more than ``threshold`` of tokens (default 10%)."""
    return float((_frequencies(freq) > threshold).double().mean())


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """``(CE_ablated − CE_sae) / (CE_ablated − CE_clean)``: 1 when splicing the reconstruction costs
    nothing, 0 when it is as bad as the ablation baseline (zero or mean ablation)."""
    values = [float(v) for v in (ce_clean, ce_sae, ce_ablated)]
    if not all(torch.isfinite(torch.tensor(values))):
        raise MechkitError(f"cross-entropy losses must be finite, got {values}")
    gap = values[2] - values[0]
    if gap == 0:
        raise MechkitError("the ablated and clean losses are equal: CE-loss recovered is undefined")
    return (values[2] - values[1]) / gap


def kl_divergence(clean_logits: Tensor, other_logits: Tensor, mask: Tensor | None = None) -> float:
    """Mean over positions of ``KL(p_clean ‖ p_other)`` in nats, from logits ``[..., vocab]``;
    ``mask`` (``[...]`` bool) keeps only real tokens."""
    p, q = _pair(clean_logits, other_logits)
    kl = (p.log_softmax(-1).exp() * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        if keep.shape[0] != kl.shape[0] or not keep.any():
            raise MechkitError("mask must match the logits' leading shape and keep at least one position")
        kl = kl[keep]
    return float(kl.mean())
