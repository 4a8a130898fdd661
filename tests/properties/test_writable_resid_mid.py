"""Writable resid_mid: a write reaches both the MLP (through its norm) and the residual skip."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.interventions import Add, Replace
from tests.conftest import tiny_hf_model, tiny_ids
from tests.float64 import exact_llama_math
from tests.gradcheck import finite_difference

SEQUENTIAL = ["gpt2", "llama", "olmoe", "qwen2_moe", "gpt_neox_sequential"]


def _model(name: str):
    if name == "gpt_neox_sequential":
        return mechkit.load(tiny_hf_model("gpt_neox", use_parallel_residual=False))
    return mechkit.load(tiny_hf_model(name))


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_replacing_resid_mid_with_itself_changes_nothing(name):
    model = _model(name)
    ids = tiny_ids()
    logits, clean = model.run_with_cache(ids, "blocks.*.resid_mid")
    same = model.run_with_interventions(ids, {s: Replace(source=clean) for s in clean}).logits
    assert (same - logits).abs().max() <= 1e-6


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_adding_to_resid_mid_equals_adding_to_attn_out(name):
    model = _model(name)
    ids = tiny_ids()
    vector = torch.linspace(-1, 1, model.info.d_model)
    for layer in range(model.info.n_layers):
        got, cache = model.run_with_interventions(
            ids, {f"blocks.{layer}.resid_mid": Add(vector=vector)}, cache=f"blocks.{layer}.resid_post"
        )
        expected, ref = model.run_with_interventions(
            ids, {f"blocks.{layer}.attn.out": Add(vector=vector)}, cache=f"blocks.{layer}.resid_post"
        )
        assert not torch.allclose(got, model(ids), atol=1e-3)
        assert (got - expected).abs().max() <= 1e-6
        torch.testing.assert_close(cache[f"blocks.{layer}.resid_post"], ref[f"blocks.{layer}.resid_post"],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resid_mid_gradients_equal_finite_differences(arch):
    with exact_llama_math():
        model = mechkit.load(tiny_hf_model(arch).double())
        ids = tiny_ids(batch=2, seq=5)

        def metric(logits, batch):
            return logits[:, -1, 3].sum() - logits[:, 2, 7].sum()

        result = model.gradients(ids, ["blocks.0.resid_mid", "blocks.1.resid_mid"], metric)
        for site in ("blocks.0.resid_mid", "blocks.1.resid_mid"):
            act = result.activations[site]
            direction = torch.randn(act.shape, generator=torch.Generator().manual_seed(0), dtype=act.dtype)
            numeric = finite_difference(model, ids, site, act, direction, metric)
            torch.testing.assert_close((result.grads[site] * direction).sum(), numeric, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "olmoe"])
def test_nnsight_resid_mid_writes_equal_the_reference(arch):
    from mechkit.models.nnsight import NNsightModel

    ref, model = mechkit.load(tiny_hf_model(arch)), NNsightModel.from_hf(tiny_hf_model(arch))
    ids = tiny_ids()
    edit = {"blocks.0.resid_mid": Add(vector=torch.linspace(-1, 1, 32)),
            "blocks.1.resid_post": Add(vector=torch.ones(32))}
    expected, ref_cache = ref.run_with_interventions(ids, edit, cache=["blocks.0.resid_post", "blocks.1.mlp.in"])
    got, cache = model.run_with_interventions(ids, edit, cache=["blocks.0.resid_post", "blocks.1.mlp.in"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for site in ref_cache:
        torch.testing.assert_close(cache[site], ref_cache[site], atol=1e-5, rtol=0)
