"""Receiver-side sites (attn.in, mlp.in, per-head q/k/v inputs) on the reference backend, and the
same sites on nnsight and TransformerLens where those backends express them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mechkit
from mechkit.errors import SiteNotSupportedError
from mechkit.interventions import Add, Replace, Scale
from tests.conftest import tiny_hf_model, tiny_ids
from tests.float64 import exact_llama_math
from tests.gradcheck import finite_difference

ATOL = 1e-5
PRE_LN = ("gpt2", "llama", "olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
RECEIVERS = ["attn.in", "mlp.in", "attn.q_in", "attn.k_in", "attn.v_in"]
# pytest filter for BERT's `output` submodule notice from nnsight
pytestmark = pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output':UserWarning")


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def metric(logits, batch):
    return logits[:, -1, 3].sum() - logits[:, 2, 7].sum()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def f64(request):
    """A float64 tiny model computed in float64 throughout."""
    with exact_llama_math():
        yield request.param, mechkit.load(tiny_hf_model(request.param).double())


# -- values and the residual algebra ----------------------------------------------------------------


@pytest.mark.parametrize("arch", PRE_LN)
def test_receivers_equal_the_residual_stream_in_pre_ln_blocks(arch):
    model = mechkit.load(tiny_hf_model(arch))
    _, c = model.run_with_cache(tiny_ids(), "blocks.*")
    for layer in range(model.info.n_layers):
        b = f"blocks.{layer}"
        assert torch.equal(c[f"{b}.attn.in"], c[f"{b}.resid_pre"])
        assert torch.equal(c[f"{b}.mlp.in"], c[f"{b}.resid_mid"])
        close(c[f"{b}.resid_pre"] + c[f"{b}.attn.out"], c[f"{b}.resid_mid"])
        close(c[f"{b}.resid_mid"] + c[f"{b}.mlp.out"], c[f"{b}.resid_post"])


def test_head_inputs_are_per_head_copies_of_the_normalised_input():
    hf = tiny_hf_model("llama")
    model = mechkit.load(hf)
    _, c = model.run_with_cache(tiny_ids(), "blocks.1.*")
    normalised = hf.model.layers[1].input_layernorm(c["blocks.1.resid_pre"])
    assert c["blocks.1.attn.q_in"].shape == (3, 7, 4, 32)
    assert c["blocks.1.attn.k_in"].shape == c["blocks.1.attn.v_in"].shape == (3, 7, 2, 32)  # per KV head
    for kind in ("q_in", "k_in", "v_in"):
        copies = c[f"blocks.1.attn.{kind}"]
        close(copies, normalised.unsqueeze(2).expand_as(copies))


def test_bert_receivers_are_the_sublayers_own_inputs():
    """Post-LN: attn.in is resid_pre, mlp.in is resid_mid; a write to attn.in leaves the skip alone."""
    hf = tiny_hf_model("bert")
    model = mechkit.load(hf)
    ids = tiny_ids()
    _, c = model.run_with_cache(ids, "blocks.0.*")
    assert torch.equal(c["blocks.0.attn.in"], c["blocks.0.resid_pre"])
    assert torch.equal(c["blocks.0.mlp.in"], c["blocks.0.resid_mid"])
    vector = torch.linspace(-1, 1, 32)
    _, edited = model.run_with_interventions(ids, {"blocks.0.attn.in": Add(vector=vector)}, cache="blocks.0.*")
    norm = hf.bert.encoder.layer[0].attention.output.LayerNorm
    assert not torch.allclose(edited["blocks.0.attn.out"], c["blocks.0.attn.out"], atol=1e-4)
    close(edited["blocks.0.resid_pre"], c["blocks.0.resid_pre"])  # the skip reads the unedited input
    close(edited["blocks.0.resid_mid"], norm(edited["blocks.0.attn.out"] + c["blocks.0.resid_pre"]))


def test_writing_attn_in_changes_only_what_attention_sees():
    """Adding v at attn.in equals feeding ln_1(resid_pre + v) to attention, with the skip unedited."""
    hf = tiny_hf_model("gpt2")
    model = mechkit.load(hf)
    ids = tiny_ids()
    vector = torch.linspace(-1, 1, 32)
    sites = ["blocks.1.resid_pre", "blocks.1.attn.in", "blocks.1.attn.out", "blocks.1.resid_mid"]
    logits, c = model.run_with_interventions(ids, {"blocks.1.attn.in": Add(vector=vector)}, cache=sites)
    close(c["blocks.1.attn.in"], c["blocks.1.resid_pre"] + vector)
    close(c["blocks.1.resid_mid"], c["blocks.1.resid_pre"] + c["blocks.1.attn.out"])  # skip: unedited
    with torch.no_grad():
        normalised = hf.transformer.h[1].ln_1(c["blocks.1.resid_pre"] + vector)
    expected, e = model.run_with_interventions(ids, {"module:transformer.h.1.ln_1": Replace(source=normalised)},
                                               cache=sites)
    close(logits, expected)
    close(c["blocks.1.attn.out"], e["blocks.1.attn.out"])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "bert"])
def test_a_head_input_write_reaches_only_that_head(arch):
    model = mechkit.load(tiny_hf_model(arch))
    ids = tiny_ids()
    clean_logits, clean = model.run_with_cache(ids, ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"])
    for kind, out, head in (("q_in", "q", 1), ("k_in", "k", 1), ("v_in", "v", 0)):
        iv = {f"blocks.0.attn.{kind}.h{head}": Scale(factor=3.0)}
        logits, c = model.run_with_interventions(ids, iv, cache=f"blocks.0.attn.{out}")
        changed = (c[f"blocks.0.attn.{out}"] - clean[f"blocks.0.attn.{out}"]).abs().amax(dim=(0, 1, 3))
        assert changed[head] > 1e-3 and (torch.cat([changed[:head], changed[head + 1:]]) < 1e-5).all()
        assert not torch.allclose(logits, clean_logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "bert", "qwen3_moe"])
def test_replacing_receivers_with_themselves_changes_nothing(arch):
    model = mechkit.load(tiny_hf_model(arch))
    ids = tiny_ids()
    logits, c = model.run_with_cache(ids, [f"blocks.*.{k}" for k in RECEIVERS])
    same = model.run_with_interventions(ids, {s: Replace(source=c) for s in c}).logits
    close(same, logits)


# -- gradients -----------------------------------------------------------------------------------------


def test_receiver_gradients_equal_finite_differences(f64):
    _, model = f64
    ids = tiny_ids(batch=2, seq=5)
    sites = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in RECEIVERS]
    result = model.gradients(ids, sites, metric)
    g = torch.Generator().manual_seed(0)
    for site in sites:
        act, grad = result.activations[site], result.grads[site]
        direction = torch.randn(act.shape, generator=g, dtype=act.dtype)
        numeric = finite_difference(model, ids, site, act, direction, metric)
        assert grad.abs().max() > 0, site
        torch.testing.assert_close((grad * direction).sum(), numeric, atol=1e-7, rtol=1e-6, msg=site)


def test_branch_and_skip_gradients_add_up(f64):
    """d/d resid_pre = d/d attn.in + d/d resid_mid (the skip); d/d resid_mid = d/d mlp.in + d/d resid_post."""
    _, model = f64
    ids = tiny_ids(batch=2, seq=5)
    sites = [f"blocks.1.{k}" for k in ("resid_pre", "attn.in", "resid_mid", "mlp.in", "resid_post")]
    grads = model.gradients(ids, sites, metric).grads
    b = "blocks.1"
    close(grads[f"{b}.attn.in"] + grads[f"{b}.resid_mid"], grads[f"{b}.resid_pre"], atol=1e-12)
    close(grads[f"{b}.mlp.in"] + grads[f"{b}.resid_post"], grads[f"{b}.resid_mid"], atol=1e-12)
    assert grads[f"{b}.attn.in"].abs().max() > 0 and grads[f"{b}.mlp.in"].abs().max() > 0


def test_head_input_gradients_sum_to_the_norm_output_gradient(f64):
    arch, model = f64
    norm = "transformer.h.0.ln_1" if arch == "gpt2" else "model.layers.0.input_layernorm"
    ids = tiny_ids(batch=2, seq=5)
    sites = [f"module:{norm}", "blocks.0.attn.q_in", "blocks.0.attn.k_in", "blocks.0.attn.v_in"]
    grads = model.gradients(ids, sites, metric).grads
    total = sum(grads[f"blocks.0.attn.{k}"].sum(2) for k in ("q_in", "k_in", "v_in"))
    close(total, grads[f"module:{norm}"], atol=1e-12)


# -- verification ----------------------------------------------------------------------------------------


def test_a_projection_that_is_not_linear_leaves_its_head_inputs_unavailable():
    hf = tiny_hf_model("llama")
    attn = hf.model.layers[0].self_attn
    attn.q_proj = nn.Sequential(attn.q_proj)  # computes the same, but is no plain linear layer
    model = mechkit.load(hf)
    with pytest.raises(SiteNotSupportedError, match="plain linear layer"):
        model.run_with_cache(tiny_ids(), "blocks.0.attn.q_in")
    assert "blocks.1.attn.q_in" in {str(s) for s in model.sites}  # other layers keep theirs
    close(model(tiny_ids()), hf(tiny_ids()).logits)


def test_n_ctx_is_the_learned_position_table_size():
    assert mechkit.load(tiny_hf_model("gpt2")).info.n_ctx == 64
    assert mechkit.load(tiny_hf_model("bert")).info.n_ctx == 64
    assert mechkit.load(tiny_hf_model("llama")).info.n_ctx is None  # rotary: no hard limit


# -- other backends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "olmoe"])
def test_nnsight_receivers_equal_the_reference(arch):
    from mechkit.models.nnsight import NNsightModel

    ref, model = mechkit.load(tiny_hf_model(arch)), NNsightModel.from_hf(tiny_hf_model(arch))
    ids = tiny_ids()
    sites = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in RECEIVERS]
    a, b = ref.gradients(ids, sites, metric), model.gradients(ids, sites, metric)
    for site in sites:
        close(b.activations[site], a.activations[site])
        torch.testing.assert_close(b.grads[site], a.grads[site], atol=ATOL, rtol=1e-4, msg=site)
    vector = torch.linspace(-1, 1, 32)
    for iv in ({"blocks.0.attn.in": Add(vector=vector)}, {"blocks.1.mlp.in": Add(vector=vector)},
               {"blocks.0.attn.q_in.h2": Scale(factor=0.5), "blocks.1.attn.v_in.h1": Scale(factor=2.0)}):
        close(model.run_with_interventions(ids, iv).logits, ref.run_with_interventions(ids, iv).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_bridge_receiver_gradients_equal_the_reference(arch):
    from mechkit.models.lens import LensModel

    hf = tiny_hf_model(arch)
    ref, lens = mechkit.load(hf), LensModel.from_hf(hf)
    kinds = ["mlp.in"] if arch == "bert" else ["attn.in", "mlp.in"]
    sites = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in kinds]
    a, b = ref.gradients(tiny_ids(), sites, metric), lens.gradients(tiny_ids(), sites, metric)
    for site in sites:
        assert b.grads[site].abs().max() > 0
        torch.testing.assert_close(b.grads[site], a.grads[site], atol=ATOL, rtol=1e-4, msg=site)


def test_hooked_transformer_receivers_need_their_flags():
    from mechkit.models.lens import hooked_transformer_from_hf

    hf = tiny_hf_model("gpt2")
    ref, ht = mechkit.load(hf), hooked_transformer_from_hf(hf)
    plain = mechkit.load(ht)
    with pytest.raises(SiteNotSupportedError, match=r"set_use_attn_in\(True\)"):
        plain.run_with_cache(tiny_ids(), "blocks.0.attn.in")
    with pytest.raises(SiteNotSupportedError, match=r"set_use_hook_mlp_in\(True\)"):
        plain.run_with_cache(tiny_ids(), "blocks.0.mlp.in")
    ht.set_use_attn_in(True)
    ht.set_use_hook_mlp_in(True)
    lens = mechkit.load(ht)
    sites = ["blocks.0.attn.in", "blocks.1.mlp.in"]
    a, b = ref.gradients(tiny_ids(), sites, metric), lens.gradients(tiny_ids(), sites, metric)
    for site in sites:  # hook_attn_in holds a copy per head: the site's gradient sums them
        close(b.activations[site], a.activations[site])
        torch.testing.assert_close(b.grads[site], a.grads[site], atol=ATOL, rtol=1e-4, msg=site)
    with pytest.raises(SiteNotSupportedError, match="hook_q_input"):
        lens.run_with_cache(tiny_ids(), "blocks.0.attn.q_in")
