"""The TransformerLens backend returns the reference backend's tensors at every site it expresses.

Two flavours: a TransformerBridge booted over each tiny HF model (all 8 architectures), and a
HookedTransformer holding the weights of the tiny GPT-2 and LLaMA. Models are built once per module.
"""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError, SiteNotSupportedError, UnsupportedArchitectureError
from mechkit.interventions import Add, Apply, Replace, Scale, Zero
from mechkit.models import lens as lens_module
from mechkit.models.lens import LensModel, hooked_transformer_from_hf
from tests.conftest import ARCHS, MOE_ARCHS, VOCAB, tiny_hf_model, tiny_ids

ATOL = 1e-5
PAIRS = [("bridge", arch) for arch in ARCHS] + [("hooked_transformer", "gpt2"), ("hooked_transformer", "llama")]
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])

HEAD_INPUTS = ("attn.q_in", "attn.k_in", "attn.v_in")

# every reference site kind the lens backend does not express, with the documented reason
NOT_EXPRESSED = {
    pair: {**dict.fromkeys(HEAD_INPUTS, lens_module.HEAD_INPUT_REASON),
           **({"moe.topk": lens_module.TOPK_REASON} if pair[1] in MOE_ARCHS else {})}
    for pair in PAIRS
}
NOT_EXPRESSED[("bridge", "bert")]["attn.in"] = lens_module.UNSUPPORTED["bert"]["attn.in"]
NOT_EXPRESSED[("hooked_transformer", "llama")]["attn.in"] = lens_module.GQA_ATTN_IN_REASON
for rotated in ("attn.rot_q", "attn.rot_k"):  # the Bridge has no rotated q/k hook for GPT-NeoX
    NOT_EXPRESSED[("bridge", "gpt_neox")][rotated] = "no TransformerLens hook point provides it for gpt_neox"
# sites it reads but cannot write
READ_ONLY = {
    **{("bridge", arch): {"moe.router": lens_module.ROUTER_READONLY} for arch in MOE_ARCHS},
    ("bridge", "bert"): {"attn.pattern": lens_module.PATTERN_READONLY},
}


def _id(pair) -> str:
    return f"{'ht' if pair[0] == 'hooked_transformer' else 'bridge'}-{pair[1]}"


@pytest.fixture(scope="module", params=PAIRS, ids=_id)
def pair(request):
    flavour, arch = request.param
    hf = tiny_hf_model(arch)
    lens = LensModel.from_hf(hf) if flavour == "bridge" else mechkit.load(_ht_with_receivers(hf))
    return flavour, arch, hf, mechkit.load(hf), lens


def _ht_with_receivers(hf):
    """A HookedTransformer whose hook_attn_in / hook_mlp_in exist (TL adds them only on request)."""
    ht = hooked_transformer_from_hf(hf)
    if ht.cfg.n_key_value_heads is None:  # TL refuses hook_attn_in under grouped-query attention
        ht.set_use_attn_in(True)
    ht.set_use_hook_mlp_in(True)
    return ht


def tl_hooks(model) -> int:
    """Hooks on TL hook points (TL's own lists and torch hooks on the HookPoint modules)."""
    points = set(model.tl.hook_dict.values())
    return sum(
        len(h.fwd_hooks) + len(h.bwd_hooks) + len(h._forward_hooks) + len(h._backward_hooks) for h in points
    )


def torch_hooks(model) -> int:
    """Torch hooks anywhere in the wrapped model (the Bridge keeps a few of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.tl.modules())


def _boom():
    raise RuntimeError("boom")


# -- reads ------------------------------------------------------------------------------------------


def test_every_site_equals_the_reference(pair):
    flavour, arch, hf, ref, lens = pair
    ids = tiny_ids()
    _, ref_cache = ref.run_with_cache(ids, "*")
    logits, cache = lens.run_with_cache(ids, "*")
    torch.testing.assert_close(logits, hf(ids).logits, atol=ATOL, rtol=0)
    assert set(cache) <= set(ref_cache)
    assert {s.kind for s in set(ref_cache) - set(cache)} == set(NOT_EXPRESSED.get((flavour, arch), {}))
    for site, value in cache.items():
        torch.testing.assert_close(value, ref_cache[site], atol=ATOL, rtol=0, msg=f"{flavour} {arch} {site}")
    assert lens.backend == "lens" and lens.flavour == flavour


def test_right_padded_batch_equals_the_reference(pair):
    """The Bridge passes the mask to HF: equal everywhere. A HookedTransformer derives position ids
    of pad tokens from the mask, so there only real positions (and real query rows) are compared."""
    flavour, arch, _, ref, lens = pair
    batch = {"input_ids": tiny_ids(), "attention_mask": MASK}
    ref_logits, ref_cache = ref.run_with_cache(batch, "*")
    logits, cache = lens.run_with_cache(batch, "*")
    real = MASK.bool() if flavour == "hooked_transformer" else torch.ones_like(MASK, dtype=torch.bool)

    def at_real(t, site=None):
        return t.transpose(1, 2)[real] if site is not None and site.kind == "attn.pattern" else t[real]

    torch.testing.assert_close(at_real(logits), at_real(ref_logits), atol=ATOL, rtol=0)
    for site, value in cache.items():
        torch.testing.assert_close(at_real(value, site), at_real(ref_cache[site], site), atol=ATOL, rtol=0,
                                   msg=f"{flavour} {arch} {site}")


def test_model_info_matches_the_reference(pair):
    _, _, _, ref, lens = pair
    for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "vocab_size", "n_experts",
                  "top_k", "moe_layers", "encoder"):
        assert getattr(lens.info, field) == getattr(ref.info, field), field
    if lens.flavour == "bridge":
        assert lens.info.n_ctx == ref.info.n_ctx
    else:  # TL allocates an [n_ctx, n_ctx] causal mask: its hard limit, rotary or not
        assert lens.info.n_ctx == lens.tl.cfg.n_ctx


def test_unembed_equals_the_reference(pair):
    _, _, _, ref, lens = pair
    resid = torch.randn(3, ref.info.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lens.unembed(resid), ref.unembed(resid), atol=ATOL, rtol=0)


# -- what the backend cannot express says why -------------------------------------------------------


def test_unexpressed_sites_raise_with_the_reason(pair):
    flavour, arch, _, ref, lens = pair
    for kind, reason in NOT_EXPRESSED.get((flavour, arch), {}).items():
        site = next(s for s in ref.sites if s.kind == kind)
        narrowed = f"{site}.e1" if kind == "moe.topk" else f"{site}.h1" if "head" in site.axes else str(site)
        for spec in (str(site), narrowed):
            with pytest.raises(SiteNotSupportedError, match="lens backend") as err:
                lens.run_with_cache(tiny_ids(), spec)
            assert reason in str(err.value)
    with pytest.raises(SiteNotSupportedError, match="hook points, not arbitrary submodules"):
        lens.run_with_cache(tiny_ids(), "module:lm_head")


def test_mlp_neurons_on_moe_layers_say_why():
    lens = LensModel.from_hf(tiny_hf_model("qwen2_moe"))  # layer 0 sparse, layer 1 dense
    assert lens.info.moe_layers == (0,)
    for kind in ("mlp.pre", "mlp.post"):
        with pytest.raises(SiteNotSupportedError, match="MoE block's input/output, not neurons"):
            lens.run_with_cache(tiny_ids(), f"blocks.0.{kind}")
        assert lens.run_with_cache(tiny_ids(), f"blocks.1.{kind}")[1][f"blocks.1.{kind}"].shape[-1] == 64


def test_read_only_sites_refuse_writes(pair):
    flavour, arch, _, _, lens = pair
    for kind, reason in READ_ONLY.get((flavour, arch), {}).items():
        with pytest.raises(SiteNotSupportedError, match="cannot intervene") as err:
            lens.run_with_interventions(tiny_ids(), {f"blocks.0.{kind}": Zero()})
        assert reason in str(err.value)
        lens.run_with_cache(tiny_ids(), f"blocks.0.{kind}")  # still readable
    writable = {s.kind for s in lens.sites if lens._writable(s) is None}
    assert writable == {s.kind for s in lens.sites} - set(READ_ONLY.get((flavour, arch), {}))


# -- writes -----------------------------------------------------------------------------------------


def test_interventions_equal_the_reference(pair):
    _, _, _, ref, lens = pair
    ids, other = tiny_ids(seed=1), tiny_ids(seed=2)
    _, source = ref.run_with_cache(other, "blocks.0.resid_post")
    interventions = [
        {"blocks.0.attn.z.h1": Zero()},
        {"blocks.0.attn.k.h1": Zero()},  # a KV head under GQA
        {"blocks.0.resid_post": Replace(source=source, positions=[2, 3])},
        {"blocks.1.mlp.out": Add(vector=torch.linspace(-1, 1, 32))},
        {"blocks.0.attn.v": Scale(factor=0.5, heads=0), "blocks.1.resid_pre": Add(vector=torch.ones(32), positions=-1)},
    ]
    for iv in interventions:
        expected = ref.run_with_interventions(ids, iv).logits
        assert not torch.allclose(expected, ref(ids))
        torch.testing.assert_close(lens.run_with_interventions(ids, iv).logits, expected, atol=ATOL, rtol=0)
        with lens.intervene(iv):
            torch.testing.assert_close(lens(ids), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lens(ids), ref(ids), atol=ATOL, rtol=0)


def test_a_write_at_every_site_equals_the_reference(pair):
    """Perturb each writable site of layer 0 (and embed / ln_final) in both backends; same logits."""
    _, _, _, ref, lens = pair
    ids = tiny_ids()

    def noise(act, site):
        return act + 0.5 * torch.randn(act.shape, generator=torch.Generator().manual_seed(0))

    for site in lens.sites:
        if site.layer not in (None, 0) or site.kind in ("logits", "attn.pattern") or lens._writable(site):
            continue
        iv = {site: Apply(fn=noise)}
        expected = ref.run_with_interventions(ids, iv).logits
        got = lens.run_with_interventions(ids, iv).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=str(site))


def test_pattern_writes_reach_the_attention_output(pair):
    """A head's pattern zeroed or scaled equals its z zeroed or scaled, and the reference's own pattern write."""
    flavour, arch, _, ref, lens = pair
    if "attn.pattern" in READ_ONLY.get((flavour, arch), {}):
        pytest.skip("pattern is read-only here (tested in test_read_only_sites_refuse_writes)")
    ids = tiny_ids()
    for layer in range(lens.info.n_layers):
        for iv in (Zero(), Scale(factor=0.25)):
            got = lens.run_with_interventions(ids, {f"blocks.{layer}.attn.pattern.h2": iv}).logits
            by_z = ref.run_with_interventions(ids, {f"blocks.{layer}.attn.z.h2": iv}).logits
            by_pattern = ref.run_with_interventions(ids, {f"blocks.{layer}.attn.pattern.h2": iv}).logits
            torch.testing.assert_close(got, by_z, atol=ATOL, rtol=0)
            torch.testing.assert_close(got, by_pattern, atol=ATOL, rtol=0)


def test_resid_mid_writes_reach_the_residual_stream(pair):
    """Pre-LN blocks: resid_mid = resid_pre + attn.out, so adding δ to either is the same edit."""
    _, arch, _, ref, lens = pair
    if arch in ("bert", "gpt_neox"):
        pytest.skip("post-LN / parallel residual blocks have other algebra")
    delta = torch.linspace(-1, 1, 32)
    for layer in range(lens.info.n_layers):
        got = lens.run_with_interventions(tiny_ids(), {f"blocks.{layer}.resid_mid": Add(vector=delta)}).logits
        expected = ref.run_with_interventions(tiny_ids(), {f"blocks.{layer}.attn.out": Add(vector=delta)}).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_gradients_equal_the_reference(pair):
    _, _, _, ref, lens = pair
    sites = ["embed", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.resid_post", "blocks.1.attn.z",
             "blocks.1.attn.pattern", "blocks.1.mlp.out"]

    def metric(logits, batch):
        return logits[:, -1, 5].sum() - logits[:, 2, 7].sum()

    if "blocks.0.resid_mid" in {str(s) for s in lens.sites}:
        sites.append("blocks.0.resid_mid")  # read-only on the Bridge, but its gradient covers the skip too
    batch = {"input_ids": tiny_ids(), "attention_mask": torch.ones_like(MASK)}
    a, b = ref.gradients(batch, sites, metric), lens.gradients(batch, sites, metric)
    torch.testing.assert_close(b.value, a.value, atol=ATOL, rtol=0)
    for site in sites:
        assert b.grads[site].abs().sum() > 0, site
        torch.testing.assert_close(b.grads[site], a.grads[site], atol=ATOL, rtol=1e-4, msg=site)
        assert not b.activations[site].requires_grad


def test_reads_are_detached_without_grad(pair):
    _, _, _, _, lens = pair
    _, cache = lens.run_with_cache(tiny_ids(), ["blocks.0.resid_post", "blocks.0.attn.z"])
    assert not any(t.requires_grad for t in cache.values())
    assert not any(p.grad is not None for p in lens.tl.parameters())


# -- hook hygiene -----------------------------------------------------------------------------------


def test_no_hooks_remain_after_runs_and_exceptions(pair):
    _, _, _, _, lens = pair
    baseline = torch_hooks(lens)
    assert tl_hooks(lens) == 0
    lens.run_with_cache(tiny_ids(), "*")
    lens.gradients(tiny_ids(), "blocks.0.resid_post", lambda logits, batch: logits.sum())
    with pytest.raises(RuntimeError, match="boom"):
        lens.run_with_interventions(tiny_ids(), {"blocks.0.mlp.out": Apply(fn=lambda a, s: _boom())})
    with pytest.raises(RuntimeError, match="boom"), lens.intervene({"blocks.1.resid_post": Zero()}):
        lens.run_with_cache(tiny_ids(), "blocks.0.resid_pre")
        _boom()
    assert tl_hooks(lens) == 0
    assert torch_hooks(lens) == baseline
    torch.testing.assert_close(lens(tiny_ids()), pair[3](tiny_ids()), atol=ATOL, rtol=0)  # no intervention left


def test_the_callers_own_tl_hooks_survive(pair):
    _, _, _, _, lens = pair
    calls = []
    lens.tl.add_hook("blocks.0.hook_resid_post", lambda act, hook: calls.append(act.shape))
    try:
        lens.run_with_cache(tiny_ids(), "blocks.0.resid_post")
        with pytest.raises(RuntimeError, match="boom"):
            lens.run_with_interventions(tiny_ids(), {"blocks.0.resid_post": Apply(fn=lambda a, s: _boom())})
        assert tl_hooks(lens) > 0
        lens.run_with_cache(tiny_ids(), "blocks.1.resid_post")
        assert len(calls) == 3
    finally:
        lens.tl.reset_hooks()
    assert tl_hooks(lens) == 0


# -- construction -----------------------------------------------------------------------------------


def test_callers_hf_model_is_left_unchanged():
    hf = tiny_hf_model("gpt2")
    before = mechkit.load(hf).parameters_fingerprint()
    modules_before = [(n, type(m)) for n, m in hf.named_modules()]
    lens = LensModel.from_hf(hf)
    lens.run_with_interventions(tiny_ids(), {"blocks.0.resid_post": Zero()})
    assert [(n, type(m)) for n, m in hf.named_modules()] == modules_before
    assert mechkit.load(hf).parameters_fingerprint() == before


def test_architectures_without_a_bridge_adapter_raise_clearly():
    import transformers as T

    from tests.conftest import tiny_config

    base = T.GPT2Model(tiny_config("gpt2")).eval()  # no LM head: TL's GPT-2 adapter does not fit it
    message = r"cannot build a TransformerBridge for GPT2Model.*backend='torch_hooks'"
    with pytest.raises(UnsupportedArchitectureError, match=message):
        LensModel.from_hf(base)


def test_other_transformer_lens_objects_raise_clearly():
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=VOCAB, n_ctx=16,
                                  act_fn="gelu")
    with pytest.raises(UnsupportedArchitectureError, match="TransformerBridge or a HookedTransformer"):
        mechkit.load(HookedEncoder(cfg))


def test_hooked_transformer_builders_refuse_what_they_cannot_convert():
    with pytest.raises(MechkitError, match=r"LensModel\.from_hf"):
        hooked_transformer_from_hf(tiny_hf_model("gpt_neox"))
    with pytest.raises(MechkitError, match="rope_type 'linear'"):
        hooked_transformer_from_hf(tiny_hf_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 10000.0}))


def test_ungrouped_gqa_keys_and_values_keep_their_kv_heads():
    hf = tiny_hf_model("llama")
    ref, ht = mechkit.load(hf), hooked_transformer_from_hf(hf)
    lens = mechkit.load(ht)
    ht.set_ungroup_grouped_query_attention(True)  # TL then hooks k/v repeated per query head
    ids = tiny_ids()
    _, a = ref.run_with_cache(ids, ["blocks.*.attn.k", "blocks.*.attn.v"])
    _, b = lens.run_with_cache(ids, ["blocks.*.attn.k", "blocks.*.attn.v"])
    for site in a:
        assert b[site].shape[2] == 2
        torch.testing.assert_close(b[site], a[site], atol=ATOL, rtol=0)
    iv = {"blocks.0.attn.k.h1": Zero(), "blocks.1.attn.v": Scale(factor=0.5, heads=0)}
    torch.testing.assert_close(lens.run_with_interventions(ids, iv).logits, ref.run_with_interventions(ids, iv).logits,
                               atol=ATOL, rtol=0)
    g_ref = ref.gradients(ids, "blocks.0.attn.v", lambda logits, batch: logits[:, -1, 3].sum())
    g_lens = lens.gradients(ids, "blocks.0.attn.v", lambda logits, batch: logits[:, -1, 3].sum())
    torch.testing.assert_close(g_lens.grads["blocks.0.attn.v"], g_ref.grads["blocks.0.attn.v"], atol=ATOL, rtol=1e-4)


def test_load_with_the_lens_backend_from_a_folder(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    model = mechkit.load(str(tmp_path), backend="lens")
    assert model.backend == "lens" and model.flavour == "bridge"
    torch.testing.assert_close(model(tiny_ids()), hf(tiny_ids()).logits, atol=ATOL, rtol=0)
