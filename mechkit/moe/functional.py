"""MoE pathway metrics as pure functions (METHODS §6, "Where to find Grokking in LLM Pretraining?").

Shapes: ``probs`` are per-token router probabilities ``[tokens, experts]`` of one layer (softmax over
all experts); a sample's routing is a list over MoE layers of its token-averaged probabilities
``[experts]``, or ``[samples, experts]`` per layer for many samples; router weights ``W_ℓ`` are
``[experts, d_model]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["complexity", "layer_cosines", "layer_pathway_distances", "mean_pathway_distance", "pathway_distance",
           "pathway_strings", "pearson", "routing_embeddings", "routing_entropy", "sample_routing", "smoothness",
           "spearman"]


def sample_routing(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Token-averaged router probabilities ``[experts]`` of one sample at one layer, over its real
    tokens (``mask`` ``[tokens]``); an error when the sample has no tokens."""
    if mask is not None:
        probs = probs[mask.bool()]
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise MechkitError("a sample with no tokens has no pathway; drop empty samples before routing them")
    return probs.double().mean(0)


def _check_tau(tau: float) -> float:
    if not 0 < tau <= 1:
        raise MechkitError(f"tau={tau}: the cumulative weight threshold must be in (0, 1]")
    return float(tau)


def pathway_strings(layers: Sequence[Tensor], tau: float = 0.7) -> list[str]:
    """Pathway strings of samples from per-layer token-averaged routing ``[samples, experts]``: per layer
    the experts in descending weight, the shortest prefix whose cumulative weight exceeds ``tau``
    (all experts when it never does), comma-separated; layers joined with "-"."""
    tau = _check_tau(tau)
    if not layers:
        raise MechkitError("no MoE layers given")
    parts = []
    for g in layers:
        g = g[None] if g.dim() == 1 else g
        weight, order = g.sort(-1, descending=True)
        before = weight.cumsum(-1) - weight  # weight of the experts ranked ahead
        keep = before <= tau + 1e-12  # an expert is needed while the ones ahead do not yet exceed tau
        parts.append([",".join(str(int(e)) for e in row[k]) for row, k in zip(order, keep)])
    return ["-".join(p) for p in zip(*parts)]


def pathway_distance(a: str, b: str, *, level: str = "character") -> int:
    """Levenshtein distance of two pathway strings, over characters (default) or over expert tokens."""
    from rapidfuzz.distance import Levenshtein

    if level == "character":
        return int(Levenshtein.distance(a, b))
    if level == "token":
        return int(Levenshtein.distance(_tokens(a), _tokens(b)))
    raise MechkitError(f"level={level!r}: use 'character' or 'token'")


def _tokens(s: str) -> list[str]:
    return [t for layer in s.split("-") for t in ([*layer.split(","), "-"])][:-1]


def mean_pathway_distance(strings: Sequence[str], *, max_samples: int | None = 2000, seed: int = 0,
                          level: str = "character") -> float:
    """Mean distance over all pairs of ``strings`` (all-pairs matrix by ``rapidfuzz.process.cdist``);
    groups larger than ``max_samples`` are subsampled with ``seed``."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    strings = list(strings)
    if len(strings) < 2:
        raise MechkitError(f"a pathway distance needs at least two samples, got {len(strings)}")
    if max_samples is not None and len(strings) > max_samples:
        pick = torch.randperm(len(strings), generator=torch.Generator().manual_seed(seed))[:max_samples]
        strings = [strings[i] for i in pick.tolist()]
    items = strings if level == "character" else [_tokens(s) for s in strings]
    if level not in ("character", "token"):
        raise MechkitError(f"level={level!r}: use 'character' or 'token'")
    d = cdist(items, items, scorer=Levenshtein.distance, workers=-1)
    n = len(items)
    return float(d.sum() / (n * (n - 1)))


def layer_pathway_distances(layers: Sequence[Tensor], tau: float = 0.7, **options) -> list[float]:
    """The per-layer variant: mean pathway distance of the single-layer strings of each layer
    (``options`` as for :func:`mean_pathway_distance`)."""
    return [mean_pathway_distance(pathway_strings([g], tau), **options) for g in layers]


def routing_embeddings(layers: Sequence[Tensor], routers: Sequence[Tensor], *,
                       center: bool = False) -> list[Tensor]:
    """e_{i,ℓ} = Σ_k ḡ_ℓ(i,k) · W_ℓ[k] per layer: ``[samples, d_model]``.

    ``center=True`` first subtracts each router's mean row (1/K) Σ_k W_ℓ[k]. Routing cannot see that
    row (it adds the same logit to every expert, which the softmax removes), yet with near-uniform
    weights it dominates e: on moe-grok-deep cos(e, mean row) ≥ 0.95, so the paper's literal
    formula measures how the optimiser moved the routers' mean rows, not the routing itself.
    """
    if len(layers) != len(routers):
        raise MechkitError(f"{len(layers)} layers of routing but {len(routers)} router matrices")
    if center:
        routers = [w - w.mean(0, keepdim=True) for w in routers]
    return [g.double() @ w.double() for g, w in zip(layers, routers)]


def layer_cosines(embeddings: Sequence[Tensor]) -> Tensor:
    """c_{i,ℓ} = cos(e_{i,ℓ}, e_{i,ℓ+1}): ``[samples, layers − 1]``."""
    if len(embeddings) < 3:
        raise MechkitError(f"smoothness needs at least 3 MoE layers (got {len(embeddings)}): with two there is "
                           "one layer pair and it is 1 for every sample")
    return torch.stack([torch.cosine_similarity(a, b, dim=-1) for a, b in itertools.pairwise(embeddings)], -1)


def smoothness(cosines: Tensor) -> Tensor:
    """S_i = (1/(L−1)) Σ_ℓ c_{i,ℓ} / (max_ℓ c_{i,ℓ} + 1e-8), ``[samples]``; samples whose largest cosine
    is not positive get 0 (the ratio is undefined there)."""
    top = cosines.max(-1, keepdim=True).values
    s = (cosines / (top + 1e-8)).mean(-1)
    return torch.where(top.squeeze(-1) > 0, s, torch.zeros_like(s))


def complexity(cosines: Tensor) -> Tensor:
    """Pathway complexity C_i = 1 − S_i (falls as generalization rises)."""
    return 1 - smoothness(cosines)


def routing_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each row of router probabilities ``[..., experts]``."""
    p = probs.double().clamp_min(1e-30)
    return -(p * p.log()).sum(-1)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D series (NaN when either is constant or shorter than 3)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.shape != y.shape:
        raise MechkitError(f"series of different lengths: {x.numel()} and {y.numel()}")
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    scale = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / scale) if scale > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    return pearson(_ranks(x), _ranks(y))


def _ranks(x: Tensor) -> Tensor:
    x = x.double().flatten()
    ties = (x[:, None] == x[None, :]).double()
    below = (x[:, None] > x[None, :]).double().sum(1)
    return below + (ties.sum(1) + 1) / 2
