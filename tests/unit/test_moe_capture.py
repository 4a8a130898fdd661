"""Routing capture: the router's top-k is the model's own expert choice on every backend that has
the site, padded batches route like single prompts, and dense models are refused."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.moe.capture import capture_routing

PROMPTS = ["3 + 5 =", "1 - 2", "7 + 7 = 14", "10 -"]  # mixed lengths


@pytest.fixture(scope="module")
def reference():
    model = mechkit.load("zoo:moe-grok")
    return model, capture_routing(model, PROMPTS, batch_size=3)


@pytest.mark.parametrize("backend", ["torch_hooks", "nnsight"])
def test_router_topk_is_the_models_choice(reference, backend):
    model, ref = reference
    trace = capture_routing(mechkit.load("zoo:moe-grok", backend=backend), PROMPTS, batch_size=3)
    k = model.torch_module.config.num_experts_per_tok
    real = trace.mask.bool()
    for probs, chosen in zip(trace.probs, trace.chosen):
        top = torch.zeros_like(probs).scatter_(-1, probs.topk(k, -1).indices, 1.0)
        assert torch.equal(top[real], chosen[real])
        assert torch.allclose(probs[real].sum(-1), torch.ones(int(real.sum())), atol=1e-5)
    for a, b in zip(trace.probs, ref.probs):
        assert torch.allclose(a, b, atol=1e-5)
    load = trace.expert_load()
    assert torch.allclose(load.sum(-1), torch.ones(len(trace.layers), dtype=torch.float64))


def test_lens_gives_the_probabilities_without_a_topk_site(reference):
    _, ref = reference
    trace = capture_routing(mechkit.load("zoo:moe-grok", backend="lens"), PROMPTS, batch_size=3)
    assert trace.chosen is None
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(trace.probs, ref.probs))
    with pytest.raises(MechkitError, match="no chosen experts"):
        trace.expert_load()


def test_padded_batches_route_like_single_prompts(reference):
    model, ref = reference
    assert ref.mask.sum(1).unique().numel() > 1  # mixed lengths
    alone = [capture_routing(model, [p]).sample_routing() for p in PROMPTS]
    for layer, per_layer in enumerate(ref.sample_routing()):
        for i in range(len(PROMPTS)):
            assert torch.allclose(per_layer[i], alone[i][layer][0], atol=1e-6)
    assert ref.pathways() == [capture_routing(model, [p]).pathways()[0] for p in PROMPTS]


def test_dense_models_and_empty_input_are_refused():
    with pytest.raises(MechkitError, match="no MoE layers"):
        capture_routing(mechkit.load("zoo:facts-lm"), PROMPTS)
    with pytest.raises(MechkitError, match="no prompts"):
        capture_routing(mechkit.load("zoo:moe-grok"), [])
