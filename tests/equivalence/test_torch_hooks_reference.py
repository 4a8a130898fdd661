"""The reference backend against HF's own outputs and against the transformer's algebra."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.interventions import Replace
from tests.conftest import ARCHS, MOE_ARCHS, tiny_hf_model, tiny_ids

ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def wrapped(request):
    hf = tiny_hf_model(request.param)
    return request.param, hf, mechkit.load(hf)


def test_logits_and_hidden_states_match_hf(wrapped):
    _, hf, model = wrapped
    ids = tiny_ids()
    logits, cache = model.run_with_cache(ids, ["blocks.*.resid_pre", "blocks.*.resid_post"])
    ref = hf(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    n = model.info.n_layers
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.resid_pre"], ref.hidden_states[layer], atol=ATOL, rtol=0)
    for layer in range(n - 1):  # HF's last hidden state is after the final norm for pre-LN models
        torch.testing.assert_close(
            cache[f"blocks.{layer}.resid_post"], ref.hidden_states[layer + 1], atol=ATOL, rtol=0
        )


def test_attention_patterns_match_hf(wrapped):
    _, hf, model = wrapped
    ids = tiny_ids()
    _, cache = model.run_with_cache(ids, "blocks.*.attn.pattern")
    ref = hf(ids, output_attentions=True).attentions
    for layer, pattern in enumerate(ref):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.pattern"], pattern, atol=ATOL, rtol=0)
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)


def test_residual_algebra(wrapped):
    """resid_mid = resid_pre + attn.out and resid_post = resid_mid + mlp.out (sequential pre-LN blocks)."""
    arch, _, model = wrapped
    if arch in ("bert", "gpt_neox"):
        pytest.skip("post-LN (BERT) and parallel-residual (NeoX) blocks have other algebra")
    _, c = model.run_with_cache(tiny_ids(), "blocks.*")
    for layer in range(model.info.n_layers):
        b = f"blocks.{layer}"
        torch.testing.assert_close(c[f"{b}.resid_mid"], c[f"{b}.resid_pre"] + c[f"{b}.attn.out"], atol=ATOL, rtol=0)
        torch.testing.assert_close(c[f"{b}.resid_post"], c[f"{b}.resid_mid"] + c[f"{b}.mlp.out"], atol=ATOL, rtol=0)


def test_neox_parallel_residual_algebra():
    model = mechkit.load(tiny_hf_model("gpt_neox"))
    _, c = model.run_with_cache(tiny_ids(), "blocks.0.*")
    total = c["blocks.0.resid_pre"] + c["blocks.0.attn.out"] + c["blocks.0.mlp.out"]
    torch.testing.assert_close(c["blocks.0.resid_post"], total, atol=ATOL, rtol=0)


def test_z_times_w_o_is_attn_out():
    hf = tiny_hf_model("llama")
    model = mechkit.load(hf)
    _, c = model.run_with_cache(tiny_ids(), ["blocks.1.attn.z", "blocks.1.attn.out", "blocks.1.attn.z.h2"])
    z = c["blocks.1.attn.z"]
    out = z.flatten(-2) @ hf.model.layers[1].self_attn.o_proj.weight.T
    torch.testing.assert_close(c["blocks.1.attn.out"], out, atol=ATOL, rtol=0)
    torch.testing.assert_close(c["blocks.1.attn.z.h2"], z[:, :, 2])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_sites_match_hf_router_logits_and_choices(arch):
    hf = tiny_hf_model(arch)
    model = mechkit.load(hf)
    ids = tiny_ids()
    _, cache = model.run_with_cache(ids, ["blocks.*.moe.router", "blocks.*.moe.topk"])
    ref = hf(ids, output_router_logits=True).router_logits
    for layer, logits in zip(model.info.moe_layers, ref):
        router = cache[f"blocks.{layer}.moe.router"]
        torch.testing.assert_close(router.reshape(-1, router.shape[-1]), logits, atol=ATOL, rtol=0)
        dense = cache[f"blocks.{layer}.moe.topk"]
        k = model.info.top_k
        assert ((dense > 0).sum(-1) == k).all(), "exactly top_k experts carry weight per token"
        # the chosen experts are those the router module returned
        chosen = dense.topk(k, dim=-1).indices.sort(-1).values
        expected = router.softmax(-1).topk(k, dim=-1).indices.sort(-1).values
        assert torch.equal(chosen, expected)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen3_moe"])
def test_zeroing_every_expert_silences_the_moe_block(arch):
    model = mechkit.load(tiny_hf_model(arch))
    ids = tiny_ids()
    _, cache = model.run_with_interventions(
        ids, {"blocks.0.moe.topk": mechkit.interventions.Zero()}, cache=["blocks.0.mlp.out"]
    )
    assert cache["blocks.0.mlp.out"].abs().max() == 0


def test_ablating_an_expert_only_changes_tokens_that_chose_it():
    model = mechkit.load(tiny_hf_model("mixtral"))
    ids = tiny_ids()
    _, clean = model.run_with_cache(ids, ["blocks.0.moe.topk", "blocks.0.mlp.out"])
    _, ablated = model.run_with_interventions(
        ids, {"blocks.0.moe.topk.e1": mechkit.interventions.Zero()}, cache=["blocks.0.mlp.out"]
    )
    chose = clean["blocks.0.moe.topk"][..., 1] > 0
    changed = (ablated["blocks.0.mlp.out"] - clean["blocks.0.mlp.out"]).abs().amax(-1) > 1e-7
    assert chose.any() and (~chose).any()
    assert torch.equal(changed, chose)


def test_gradients_match_finite_differences():
    hf = tiny_hf_model("gpt2").double()
    model = mechkit.load(hf)
    ids = tiny_ids(batch=2, seq=5)

    def metric(logits, batch):
        return logits[:, -1, 3].sum()

    result = model.gradients(ids, ["blocks.0.resid_post", "blocks.1.attn.z"], metric)
    for name in ("blocks.0.resid_post", "blocks.1.attn.z"):
        act, grad = result.activations[name], result.grads[name]
        direction = torch.randn_like(act)
        eps = 1e-6
        plus = model.run_with_interventions(ids, {name: Replace(source=act + eps * direction)})[0]
        minus = model.run_with_interventions(ids, {name: Replace(source=act - eps * direction)})[0]
        numeric = (metric(plus, None) - metric(minus, None)) / (2 * eps)
        torch.testing.assert_close((grad * direction).sum(), numeric, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in hf.parameters())


@pytest.mark.parametrize("backend", ["torch_hooks", "nnsight"])
def test_unembedding_the_last_residual_gives_the_logits(wrapped, backend):
    _, hf, model = wrapped
    if backend == "nnsight":
        from mechkit.models.nnsight import NNsightModel

        model = NNsightModel.from_hf(hf)
    ids = tiny_ids()
    last = f"blocks.{model.info.n_layers - 1}.resid_post"
    logits, cache = model.run_with_cache(ids, last)
    torch.testing.assert_close(model.unembed(cache[last]), logits, atol=ATOL, rtol=0)
