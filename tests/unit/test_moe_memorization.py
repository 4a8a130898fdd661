"""Memorization bookkeeping (METHODS §6) and the correlations of the monitor on hand-made series."""

from __future__ import annotations

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.moe import auto_epsilon, generalized_at, memorized_since, pearson, spearman

# 4 checkpoints × 4 samples
LOSSES = torch.tensor([
    [3.0, 3.0, 3.0, 0.05],
    [0.08, 2.0, 0.04, 0.05],
    [0.09, 0.09, 0.30, 0.05],  # sample 2 leaves the memorized region here, then comes back
    [0.05, 0.07, 0.02, 2.00],  # sample 3 is forgotten at the end
])


def test_memorized_since_needs_every_later_checkpoint():
    assert memorized_since(LOSSES, epsilon=0.1, delta=0.05).tolist() == [1, 2, 3, -1]
    # δ: the loss must also be close to the final one; 0.09 vs 0.02 is 0.07 away
    assert memorized_since(LOSSES, epsilon=0.1, delta=0.01).tolist() == [3, 3, 3, -1]
    assert memorized_since(LOSSES, epsilon=0.35, delta=0.5).tolist() == [1, 2, 1, -1]
    with pytest.raises(MechkitError, match="non-negative"):
        memorized_since(LOSSES, epsilon=-1.0)


def test_auto_epsilon_hits_the_target_fraction():
    torch.manual_seed(0)
    losses = torch.rand(5, 1000)
    for fraction in (0.2, 0.25, 1.0):
        eps = auto_epsilon(losses, fraction)
        ended = (memorized_since(losses, eps, delta=10.0) >= 0).double().mean()
        assert float(ended) == pytest.approx(fraction)
    with pytest.raises(MechkitError, match="fraction"):
        auto_epsilon(losses, 0.0)


def test_generalized_at_is_the_start_of_the_final_correct_run():
    correct = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 1, 0]]).bool()
    assert generalized_at(correct).tolist() == [3, 0, -1]


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(1)
    x, y = torch.randn(12), torch.randn(12)
    x[3] = x[5] = x[7]  # ties get average ranks
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-9)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-9)
    assert pearson(torch.ones(5), y[:5]) != pearson(torch.ones(5), y[:5])  # constant series: NaN
