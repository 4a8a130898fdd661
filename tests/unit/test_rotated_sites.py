"""``attn.rot_q`` / ``attn.rot_k``: the queries and keys after rotary embeddings, as the attention
scores use them — read, written and differentiated inside mechkit's attention function."""

from __future__ import annotations

import math

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.models.torch_hooks import TorchHooksModel
from tests.conftest import tiny_hf_model, tiny_ids


@pytest.fixture(scope="module")
def model():
    return TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=2))  # GQA: 4 query heads, 2 KV heads


def _padded():
    ids = tiny_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_rotated_queries_and_keys_reproduce_the_pattern(model):
    batch = _padded()
    cache = model.run_with_cache(batch, ["blocks.1.attn.rot_q", "blocks.1.attn.rot_k", "blocks.1.attn.pattern",
                                         "blocks.1.attn.q"]).cache
    q, k = cache["blocks.1.attn.rot_q"], cache["blocks.1.attn.rot_k"]
    assert q.shape == (3, 6, 4, 8) and k.shape == (3, 6, 2, 8)
    keys = k.repeat_interleave(2, dim=2)
    visible = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & batch["attention_mask"].bool()[:, None, None]
    scores = torch.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(8)
    pattern = scores.masked_fill(~visible, -math.inf).softmax(-1)
    real = batch["attention_mask"].bool()[:, None, :, None]
    torch.testing.assert_close(pattern * real, cache["blocks.1.attn.pattern"] * real, atol=1e-6, rtol=0)
    assert not torch.allclose(cache["blocks.1.attn.q"], q)  # rotary moved them


def test_rotated_writes_take_effect(model):
    ids = tiny_ids(2, 5)
    plain = model.run_with_cache(ids, "blocks.0.resid_post")
    same = model.run_with_interventions(ids, {"blocks.1.attn.rot_q": lambda x: x.clone()})
    assert torch.equal(same.logits, plain.logits)
    flat = model.run_with_interventions(ids, {"blocks.1.attn.rot_k": lambda x: torch.zeros_like(x)},
                                        cache="blocks.1.attn.pattern").cache["blocks.1.attn.pattern"]
    uniform = torch.ones(5, 5).tril() / torch.arange(1, 6)[:, None]
    torch.testing.assert_close(flat, uniform.expand_as(flat))  # zero keys: every visible key weighs alike


def test_gradients_at_rotated_queries_equal_finite_differences(model):
    model64 = TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=2).double())
    ids = tiny_ids(2, 5)

    def metric(logits, batch):
        return logits[:, -1, 3].sum()

    grads = model64.gradients(ids, "blocks.1.attn.rot_q", metric)
    site, (b, t, h, d), eps = "blocks.1.attn.rot_q", (1, 3, 2, 5), 1e-6
    base = grads.activations[site]

    def bumped(delta):
        def write(x):
            x = x.clone()
            x[b, t, h, d] += delta
            return x

        return float(metric(model64.run_with_interventions(ids, {site: write}).logits, None))

    numeric = (bumped(eps) - bumped(-eps)) / (2 * eps)
    assert base.shape == grads.grads[site].shape
    assert abs(float(grads.grads[site][b, t, h, d]) - numeric) < 1e-6


def test_a_prefix_run_refuses_rotated_key_writes(model):
    with pytest.raises(MechkitError, match="one position axis"):
        model.run_with_interventions(tiny_ids(2, 6), {"blocks.0.attn.rot_k": lambda x: x}, prefix=2)
