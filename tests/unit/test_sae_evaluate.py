"""CE-loss recovered by splicing: exact for a perfect reconstruction, zero for a reconstruction that
equals the ablation, and the same for padded batches as prompt by prompt."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.sae.evaluate import ce_recovered
from mechkit.tasks import TaskSet

SITE = "blocks.1.resid_post"


class Identity:
    def encode(self, x):
        return x

    def decode(self, z):
        return z


class Nothing(Identity):
    def decode(self, z):
        return torch.zeros_like(z)


@pytest.fixture(scope="module")
def model_and_prompts():
    items = TaskSet.from_jsonl("probes/truth_medium.jsonl")
    return mechkit.load("zoo:facts-lm"), items.prompts[:24]


def test_perfect_and_useless_reconstructions(model_and_prompts):
    model, prompts = model_and_prompts
    perfect = ce_recovered(model, Identity(), SITE, prompts)
    assert perfect["recovered"] == pytest.approx(1.0, abs=1e-5) and perfect["kl"] < 1e-6
    assert perfect["ce_ablated"] > perfect["ce_clean"] + 0.5
    useless = ce_recovered(model, Nothing(), SITE, prompts)
    assert useless["recovered"] == pytest.approx(0.0, abs=1e-5) and useless["kl"] > 0.1
    mean = ce_recovered(model, Nothing(), SITE, prompts, ablation="mean")
    assert mean["ce_ablated"] < useless["ce_ablated"]  # mean ablation is the gentler baseline


def test_padded_batches_equal_prompt_by_prompt(model_and_prompts):
    model, prompts = model_and_prompts
    assert len({len(model.tokenize(p).input_ids[0]) for p in prompts}) > 1
    batched = ce_recovered(model, Nothing(), SITE, prompts, batch_size=8)
    single = ce_recovered(model, Nothing(), SITE, prompts, batch_size=1)
    for key in batched:
        assert batched[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6)


def test_bad_input(model_and_prompts):
    model, prompts = model_and_prompts
    with pytest.raises(MechkitError, match="ablation"):
        ce_recovered(model, Identity(), SITE, prompts, ablation="random")
    with pytest.raises(MechkitError, match="no prompts"):
        ce_recovered(model, Identity(), SITE, [])
