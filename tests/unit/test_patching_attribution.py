"""Attribution patching (AtP, AtP*, RelP) against exact activation patching done here, node by node.

Exact patching in these tests is the plain definition — one ``run_with_interventions`` per node —
so the estimates are checked against an independent computation path: equal where linearisation is
exact (a model with no nonlinearity, the final residual under a linear metric), correlated on
facts-lm IOI, equal across backends, equal prompt by prompt with mixed lengths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mechkit
from mechkit import tasks
from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.models.inputs import Batch
from mechkit.patching import PatchingPairs, PatchingResult, logit_diff, make_pairs, recovery
from mechkit.patching.attribution import (
    AttributionConfig,
    attribution_correlation,
    attribution_nodes,
    attribution_patching,
)
from mechkit.patching.relevance import _elementwise_rule, _gated_rule, _layer_norm_rule, relevance_rules
from tests.conftest import tiny_hf_model, tiny_ids


@pytest.fixture(scope="module")
def model():
    return mechkit.load("zoo:facts-lm")


@pytest.fixture(scope="module")
def pairs(model):
    return make_pairs(model, tasks.generate("ioi", 8, 0, corrupt="abc"))


def _linear_toy():
    """A 2-layer GPT-2 with no nonlinearity: identity norms, linear MLP activation, and zero query/key
    weights (a constant, uniform causal pattern), so the metric is linear in every activation."""
    hf = tiny_hf_model("gpt2", activation_function="linear")
    d = hf.config.n_embd
    with torch.no_grad():
        for block in hf.transformer.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
        hf.transformer.ln_f = nn.Identity()
    return mechkit.load(hf)


def _toy_pairs(lengths=(7, 5, 6)):
    n = len(lengths)
    clean, corrupt = tiny_ids(n, 7, seed=1), tiny_ids(n, 7, seed=2)
    mask = torch.stack([torch.arange(7) < k for k in lengths]).long()
    clean, corrupt = clean * mask, corrupt * mask
    texts = tuple(str(i) for i in range(n))
    return PatchingPairs(Batch(clean, mask), Batch(corrupt, mask), torch.arange(n) + 3, torch.arange(n) + 3 + n,
                         texts, texts)


def _exact(model, pairs, site, direction="noise", pos=None, **selectors):
    """Per-prompt metric with one node patched (source → base), by a plain intervened forward; ``pos``
    patches one position in the rows that have it."""
    base, source = (pairs.corrupt, pairs.clean) if direction == "denoise" else (pairs.clean, pairs.corrupt)
    if pos is not None:
        real = base.attention_mask.bool()
        selectors["positions"] = real & (torch.arange(real.shape[1]) == pos)
    cache = model.run_with_cache(source, site).cache
    return logit_diff(model.run_with_interventions(base, {site: Replace(source=cache, **selectors)}).logits, pairs)


def test_atp_and_relp_are_exact_on_a_model_with_no_nonlinearity():
    toy, pairs = _linear_toy(), _toy_pairs()
    for sites, unit in (("blocks.*.attn.z", "heads"), ("blocks.*.mlp.post", "neurons"),
                        ("blocks.*.resid_pre,blocks.*.attn.out", None)):
        atp = attribution_patching(toy, pairs, sites=sites, normalize=False, per_prompt=True)
        relp = attribution_patching(toy, pairs, sites=sites, normalize=False, per_prompt=True, method="relp")
        torch.testing.assert_close(relp.scores, atp.scores, equal_nan=True, atol=1e-5, rtol=1e-5)
        for i, site in enumerate(atp.label("site")):
            for pos in (0, 4, 6):
                for j in ((1, 3) if unit else (None,)):
                    exact = _exact(toy, pairs, site, pos=pos, **({unit: [j]} if unit else {}))
                    est = atp.scores[:, i, j, pos] if unit else atp.scores[:, i, pos]
                    real = pairs.clean.attention_mask[:, pos].bool()
                    torch.testing.assert_close(est[real], exact[real], atol=1e-4, rtol=1e-4)
                    assert torch.isnan(est[~real]).all()  # positions a prompt does not have


def test_atp_is_exact_at_the_final_residual_with_a_linear_metric(model, pairs):
    width = pairs.clean.input_ids.shape[1]
    m_clean = logit_diff(model(pairs.clean), pairs).mean()
    m_corrupt = logit_diff(model(pairs.corrupt), pairs).mean()
    for direction in ("denoise", "noise"):
        atp = attribution_patching(model, pairs, sites="ln_final", direction=direction)
        exact = torch.stack([recovery(_exact(model, pairs, "ln_final", direction, pos=p).mean(), m_clean,
                                      m_corrupt, direction=direction) for p in range(width)])
        torch.testing.assert_close(atp.scores[0], exact.float(), atol=1e-4, rtol=1e-4)
        # ln_final acts only through each prompt's last position: patching those recovers everything
        assert float(atp.scores[0].sum()) == pytest.approx(1.0, abs=1e-4)


def test_head_ranking_correlates_with_exact_patching_on_ioi(model, pairs):
    m_clean = logit_diff(model(pairs.clean), pairs).mean()
    m_corrupt = logit_diff(model(pairs.corrupt), pairs).mean()
    for direction in ("noise", "denoise"):
        atp = attribution_patching(model, pairs, sites="blocks.*.attn.z", per="all", direction=direction)
        n_layers, n_heads = atp.scores.shape
        exact = torch.tensor([[float(recovery(_exact(model, pairs, f"blocks.{layer}.attn.z", direction,
                                                     heads=[h]).mean(), m_clean, m_corrupt, direction=direction))
                               for h in range(n_heads)] for layer in range(n_layers)])
        exact_result = PatchingResult(exact, atp.axes, atp.labels, "activation", "logit_diff", direction=direction)
        relp = attribution_patching(model, pairs, sites="blocks.*.attn.z", per="all", method="relp",
                                    direction=direction)
        for approx in (atp, relp):
            corr = attribution_correlation(approx, exact_result)
            assert corr.spearman >= 0.8 and corr.n_cells == n_layers * n_heads, (direction, approx.method, corr)
        # the reference correlation, computed by hand
        a, b = atp.scores.flatten().double(), exact.flatten().double()
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert attribution_correlation(atp, exact_result).pearson == pytest.approx(pearson, abs=1e-6)
    with pytest.raises(MechkitError, match="same direction"):
        attribution_correlation(atp, PatchingResult(exact, atp.axes, atp.labels, "activation", "logit_diff",
                                                    direction="noise"))


def test_mixed_lengths_equal_each_prompt_alone(model, pairs):
    assert len(set(pairs.lengths.tolist())) > 1
    together = attribution_patching(model, pairs, sites="blocks.*.attn.z,blocks.*.attn.v", normalize=False,
                                    per_prompt=True)
    for i in range(len(pairs)):
        n = int(pairs.lengths[i])
        alone = attribution_patching(model, pairs.select([i]), sites="blocks.*.attn.z,blocks.*.attn.v",
                                     normalize=False, per_prompt=True)
        torch.testing.assert_close(together.scores[i, ..., :n], alone.scores[0, ..., :n], atol=1e-4, rtol=1e-4)
        assert torch.isnan(together.scores[i, ..., n:]).all()
    # the prompt mean treats a missing position as unpatched
    mean = attribution_patching(model, pairs, sites="blocks.*.attn.z,blocks.*.attn.v", normalize=False)
    base = logit_diff(model(pairs.clean), pairs)  # the base run of direction="noise"
    filled = torch.where(torch.isnan(together.scores), base.reshape(-1, 1, 1, 1).float(), together.scores)
    torch.testing.assert_close(mean.scores, filled.mean(0), atol=1e-4, rtol=1e-4)


def test_gradients_at_attn_z_equal_across_backends(model, pairs):
    def summed(logits, batch):
        return logit_diff(logits, pairs).sum()

    reference = model.gradients(pairs.clean, "blocks.*.attn.z", summed)
    atp = attribution_patching(model, pairs, sites="blocks.*.attn.z")
    for backend in ("lens", "nnsight"):
        other = mechkit.load("zoo:facts-lm", backend=backend)
        grads = other.gradients(pairs.clean, "blocks.*.attn.z", summed)
        for site in reference.grads:
            assert float(reference.grads[site].abs().max()) > 0
            torch.testing.assert_close(grads.grads[site], reference.grads[site], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attribution_patching(other, pairs, sites="blocks.*.attn.z").scores, atp.scores,
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(MechkitError, match="torch_hooks"):
            attribution_patching(other, pairs, sites="blocks.*.attn.z", method="relp")


def test_relevance_rules_leave_values_and_weights_and_are_removed():
    for arch in ("gpt2", "llama"):
        hf = tiny_hf_model(arch)
        wrapped = mechkit.load(hf)
        ids = tiny_ids(2, 6)
        weights = {k: v.clone() for k, v in hf.state_dict().items()}
        before = wrapped(ids)
        for attention in ("detach", "half", "gradient"):
            with relevance_rules(wrapped, attention=attention) as names:
                assert torch.equal(wrapped(ids), before)  # values bit for bit; only the backward changes
        kinds = {type(m).__name__ for n, m in hf.named_modules() if n in names}
        expected = {"LayerNorm", "NewGELUActivation"} if arch == "gpt2" else {"LlamaRMSNorm", "LlamaMLP",
                                                                                "SiLUActivation"}
        assert expected <= kinds, (arch, kinds)
        with pytest.raises(RuntimeError, match="boom"), relevance_rules(wrapped):
            raise RuntimeError("boom")
        assert not any("forward" in m.__dict__ for m in hf.modules())
        assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())
        assert torch.equal(wrapped(ids), before)


def test_each_relevance_rule_has_the_backward_it_claims():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    ln = nn.LayerNorm(8).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    g = torch.randn(3, 8, dtype=torch.float64)
    out = _layer_norm_rule(ln, ln.forward)(x)
    torch.testing.assert_close(out, ln(x))
    (grad,) = torch.autograd.grad(out, x, g)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    wg = g * ln.weight / sigma  # LN rule: (x − mean(x)) / σ with σ constant
    torch.testing.assert_close(grad, wg - wg.mean(-1, keepdim=True))
    gelu = nn.GELU()
    out = _elementwise_rule(gelu.forward)(x)
    torch.testing.assert_close(out, gelu(x))
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(grad, g * gelu(x) / x)  # identity rule: f(x)/x
    hf = tiny_hf_model("llama").double()
    mlp = hf.model.layers[0].mlp
    h = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    out = _gated_rule(mlp)(h)
    torch.testing.assert_close(out, mlp(h))
    (grad,) = torch.autograd.grad(out, h, torch.ones_like(out))
    a, u = mlp.act_fn(mlp.gate_proj(h)), mlp.up_proj(h)
    through_gate = torch.autograd.grad(mlp.down_proj(a * u.detach()).sum(), h)[0]
    through_up = torch.autograd.grad(mlp.down_proj(a.detach() * u).sum(), h)[0]
    torch.testing.assert_close(grad, 0.5 * (through_gate + through_up))  # half rule


def _sharp(arch: str):
    """A 3-layer model whose last layer attends sharply, where linearising the softmax is visibly off."""
    hf = tiny_hf_model(arch, n_layer=3) if arch == "gpt2" else tiny_hf_model(arch, num_hidden_layers=3,
                                                                            num_key_value_heads=4)
    with torch.no_grad():
        if arch == "gpt2":  # learned positions: softmax(q·kᵀ/√d) of attn.q / attn.k is the pattern
            hf.transformer.h[2].attn.c_attn.weight[:, : 2 * hf.config.n_embd] *= 6
        else:  # rotary: the pattern is softmax of the rotated queries and keys (attn.rot_q / rot_k)
            hf.model.layers[2].self_attn.q_proj.weight *= 6
            hf.model.layers[2].self_attn.k_proj.weight *= 6
    return mechkit.load(hf)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_fix_recomputes_the_pattern_exactly(arch):
    model = _sharp(arch)
    pairs = _toy_pairs(lengths=(7, 7, 7, 7, 6))
    layer, head, t = 2, 1, int(pairs.last[0])
    fixed = attribution_patching(model, pairs, sites=f"blocks.{layer}.attn.q,blocks.{layer}.attn.k", qk_fix=True,
                                 normalize=False, per_prompt=True, direction="denoise")
    site = f"blocks.{layer}.attn.pattern"
    grads = model.gradients(pairs.corrupt, site, lambda logits, b: logit_diff(logits, pairs).sum())
    base = logit_diff(grads.logits, pairs)
    for kind, pos in (("q", t), ("k", 2), ("k", 5)):
        clean = model.run_with_cache(pairs.clean, f"blocks.{layer}.attn.{kind}").cache
        at = pairs.corrupt.attention_mask.bool() & (torch.arange(pairs.corrupt.shape[1]) == pos)
        patch = {f"blocks.{layer}.attn.{kind}": Replace(source=clean, positions=at, heads=[head])}
        patched = model.run_with_interventions(pairs.corrupt, patch, cache=site).cache[site]
        expected = ((patched - grads.activations[site]) * grads.grads[site]).sum((1, 2, 3)) + base
        index, real = (0 if kind == "q" else 1), at.any(-1)
        assert real.sum() >= 4
        torch.testing.assert_close(fixed.scores[real, index, head, pos], expected[real], atol=1e-4, rtol=1e-4)
    everywhere = attribution_patching(model, pairs, sites=f"blocks.{layer}.attn.q,blocks.{layer}.attn.k",
                                      qk_fix=True, normalize=False, per_prompt=True, per="all", direction="denoise")
    for index, kind in enumerate("qk"):  # every query (key) of the head patched at once, read back exactly
        clean = model.run_with_cache(pairs.clean, f"blocks.{layer}.attn.{kind}").cache
        patch = {f"blocks.{layer}.attn.{kind}": Replace(source=clean, heads=[head])}
        patched = model.run_with_interventions(pairs.corrupt, patch, cache=site).cache[site]
        expected = ((patched - grads.activations[site]) * grads.grads[site]).sum((1, 2, 3)) + base
        torch.testing.assert_close(everywhere.scores[:, index, head], expected, atol=1e-4, rtol=1e-4)
    plain = attribution_patching(model, pairs, sites=f"blocks.{layer}.attn.q", normalize=False, per_prompt=True,
                                 direction="denoise")
    linear, exact = plain.scores[0, 0, head, t] - base[0], fixed.scores[0, 0, head, t] - base[0]
    assert abs(float(linear - exact)) > 0.05 * abs(float(exact)) > 0, (float(linear), float(exact))


def test_qk_fix_refuses_a_rotary_model_without_rotated_sites():
    nnsight = pytest.importorskip("nnsight")
    rotary = mechkit.load(nnsight.NNsight(tiny_hf_model("llama")))  # no attn.rot_q / rot_k on this backend
    with pytest.raises(MechkitError, match="rotary"):
        attribution_patching(rotary, _toy_pairs(), sites="blocks.0.attn.q", qk_fix=True)


def test_grad_drop_keeps_last_layer_nodes_and_averages_magnitudes(model, pairs):
    plain = attribution_patching(model, pairs, sites="blocks.*.attn.z", per="all")
    dropped = attribution_patching(model, pairs, sites="blocks.*.attn.z", per="all", grad_drop=True)
    # a last-layer head has no later layer to drop: its |effect| is kept by the L − 1 other dropouts
    torch.testing.assert_close(dropped.scores[-1], plain.scores[-1].abs(), atol=1e-5, rtol=1e-4)
    assert (dropped.scores >= 0).all() and dropped.method == "atp+grad_drop"
    assert not torch.allclose(dropped.scores[0], plain.scores[0].abs(), atol=1e-3)


def test_nodes_results_and_bad_input(model, pairs):
    nodes = attribution_nodes(model, pairs)
    assert set(nodes) == {"layers", "attn.z", "mlp.post"}
    assert nodes["attn.z"].axes == ("site", "head", "position") and nodes["mlp.post"].axes[1] == "neuron"
    single = attribution_patching(model, pairs, sites="blocks.*.mlp.post")
    torch.testing.assert_close(nodes["mlp.post"].scores, single.scores)
    assert AttributionConfig.from_yaml(AttributionConfig(sites="blocks.*.attn.z", qk_fix=False).to_yaml()).per == \
        "position"

    def nan_metric(logits, targets):
        return logit_diff(logits, targets) * float("nan")

    with pytest.raises(MechkitError, match="NaN"):
        attribution_patching(model, pairs, metric=nan_metric)
    with pytest.raises(MechkitError, match="node types"):
        attribution_patching(model, pairs, sites="blocks.*.attn.z,blocks.*.mlp.post")
    with pytest.raises(MechkitError, match="no sites"):
        attribution_patching(model, pairs, sites="")
    with pytest.raises(MechkitError, match="per_prompt"):
        attribution_patching(model, pairs, per_prompt=True)
    with pytest.raises(MechkitError, match="different axes"):
        attribution_correlation(single, nodes["attn.z"])
    with pytest.raises(MechkitError, match="normalize"):
        attribution_correlation(single, attribution_patching(model, pairs, sites="blocks.*.mlp.post", normalize=False))
    same = make_pairs(model, list(pairs.clean_prompts), list(pairs.clean_prompts), pairs.answers.tolist(),
                      pairs.wrong.tolist())
    with pytest.raises(MechkitError, match="no effect to explain"):
        attribution_patching(model, same)


def test_correlation_with_batched_activation_patching_matches_every_cell():
    from mechkit.patching import activation_patching

    model = mechkit.load("zoo:facts-lm")
    pairs = make_pairs(model, tasks.generate("ioi", 8, 0))
    for atp_options, exact_options in (({"per": "all"}, {"positions": "all"}), ({}, {"positions": "each"})):
        approx = attribution_patching(model, pairs, sites="blocks.*.attn.z", direction="noise", **atp_options)
        exact = activation_patching(model, pairs, sites="blocks.*.attn.z", direction="noise", **exact_options)
        corr = attribution_correlation(approx, exact)
        assert corr.n_cells == exact.scores.numel()  # heads and positions line up label for label
        assert corr.spearman >= 0.8
