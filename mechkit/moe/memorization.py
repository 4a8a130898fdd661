"""Memorization bookkeeping over a checkpoint series (METHODS §6), as pure functions.

``losses`` is ``[checkpoints, samples]`` (each sample's mean token NLL at each checkpoint, in training
order). Sample i is memorized from the earliest checkpoint t* such that at every later checkpoint
its loss is ≤ ε and within δ of its final loss. On the test side, a sample is generalized from the
earliest checkpoint after which it stays correct. Both return checkpoint indices, −1 for never.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["auto_epsilon", "generalized_at", "memorized_since", "stays_true_from"]


def stays_true_from(ok: Tensor) -> Tensor:
    """``[samples]``: the first checkpoint index from which ``ok`` ``[checkpoints, samples]`` holds to
    the end, −1 when it does not hold at the last checkpoint."""
    if ok.dim() != 2 or ok.shape[0] == 0:
        raise MechkitError(f"expected [checkpoints, samples], got shape {tuple(ok.shape)}")
    to_end = torch.flip(torch.cumprod(torch.flip(ok.int(), [0]), 0), [0])  # 1 where ok holds from here on
    count = to_end.sum(0)
    return torch.where(count > 0, ok.shape[0] - count, torch.full_like(count, -1))


def memorized_since(losses: Tensor, epsilon: float, delta: float = 0.05) -> Tensor:
    """t* per sample (checkpoint index, −1 if never memorized) for the rule (ε, δ)."""
    if epsilon < 0 or delta < 0:
        raise MechkitError(f"epsilon={epsilon}, delta={delta}: both must be non-negative")
    losses = losses.double()
    ok = (losses <= epsilon) & ((losses - losses[-1]).abs() <= delta)
    return stays_true_from(ok)


def auto_epsilon(losses: Tensor, fraction: float) -> float:
    """The smallest ε with which ``fraction`` of the samples end memorized: a sample ends memorized
    exactly when its final loss is ≤ ε (δ holds trivially at the last checkpoint)."""
    if not 0 < fraction <= 1:
        raise MechkitError(f"fraction={fraction}: the share of samples to end memorized must be in (0, 1]")
    final = losses[-1].double().sort().values
    return float(final[max(math.ceil(fraction * final.numel()), 1) - 1])


def generalized_at(correct: Tensor) -> Tensor:
    """Per test sample, the first checkpoint index from which it stays correct (−1: wrong at the end)."""
    return stays_true_from(correct.bool())
