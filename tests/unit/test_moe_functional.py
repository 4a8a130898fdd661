"""The definitions of METHODS §6 on hand-made routing."""

from __future__ import annotations

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.moe import (
    complexity,
    layer_cosines,
    mean_pathway_distance,
    pathway_distance,
    pathway_strings,
    routing_embeddings,
    routing_entropy,
    sample_routing,
    smoothness,
)


def test_levenshtein_of_the_paper_example():
    assert pathway_distance("3,1,5-9,1", "3,1,5-9,2") == 1
    assert pathway_distance("3,1,5-9,1", "3,1,5-9,1") == 0
    assert pathway_distance("3,1-9", "3,1,5-9", level="token") == 1  # one expert added


def test_threshold_keeps_the_shortest_prefix_above_tau():
    g = torch.tensor([[0.2, 0.5, 0.3]])
    assert pathway_strings([g], tau=0.7) == ["1,2"]
    assert pathway_strings([g], tau=0.5) == ["1,2"]  # 0.5 is not above 0.5
    assert pathway_strings([g], tau=0.4) == ["1"]
    assert pathway_strings([g, g], tau=1.0) == ["1,2,0-1,2,0"]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(MechkitError, match="tau"):
            pathway_strings([g], tau=bad)


def test_identical_routing_has_distance_zero_and_pairs_average():
    g = torch.tensor([[0.6, 0.4, 0.0]] * 5)
    assert mean_pathway_distance(pathway_strings([g, g])) == 0.0
    strings = ["0,1-2", "0,1-2", "0-2"]
    expected = sum(pathway_distance(a, b) for i, a in enumerate(strings) for j, b in enumerate(strings) if i != j) / 6
    assert mean_pathway_distance(strings) == pytest.approx(expected)
    with pytest.raises(MechkitError, match="two samples"):
        mean_pathway_distance(["0"])


def test_identical_routers_and_weights_are_perfectly_smooth():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    g = torch.softmax(torch.randn(3, 4), -1)
    cos = layer_cosines(routing_embeddings([g, g, g, g], [w, w, w, w]))
    assert torch.allclose(smoothness(cos), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(complexity(cos), torch.zeros(3, dtype=torch.float64), atol=1e-7)
    other = layer_cosines(routing_embeddings([g, g, g], [w, -w, w]))
    assert (smoothness(other) == 0).all()  # every cosine is -1: no positive maximum
    with pytest.raises(MechkitError, match="3 MoE layers"):
        layer_cosines(routing_embeddings([g, g], [w, w]))


def test_sample_routing_counts_real_tokens_and_refuses_empty_samples():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(sample_routing(probs, torch.tensor([1, 1, 0])), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(MechkitError, match="no tokens"):
        sample_routing(probs, torch.zeros(3))
    assert routing_entropy(torch.tensor([0.5, 0.5])) == pytest.approx(0.6931, abs=1e-4)


def test_centred_routing_embeddings_ignore_what_routing_cannot_see():
    """Adding one vector to every router row leaves the softmax routing unchanged; centred routing
    embeddings (and so smoothness) do not move, the literal ones do."""
    import torch

    from mechkit.moe import functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=gen)
    routers = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    shifted = [w + torch.randn(1, 16, generator=gen) * 3 for w in routers]
    probs = [(x @ w.T).softmax(-1) for w in routers]
    assert all(torch.allclose(p, (x @ w.T).softmax(-1), atol=1e-5) for p, w in zip(probs, shifted))
    plain = F.smoothness(F.layer_cosines(F.routing_embeddings(probs, routers, center=True)))
    moved = F.smoothness(F.layer_cosines(F.routing_embeddings(probs, shifted, center=True)))
    assert torch.allclose(plain, moved, atol=1e-9)
    literal = F.smoothness(F.layer_cosines(F.routing_embeddings(probs, shifted)))
    assert not torch.allclose(literal, plain, atol=1e-3)
