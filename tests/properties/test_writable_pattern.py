"""Writable attention patterns on the reference backend (mechkit's eager-equivalent attention function)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mechkit
from mechkit.errors import SiteNotSupportedError
from mechkit.interventions import Apply, Replace
from tests.conftest import ARCHS, tiny_hf_model, tiny_ids
from tests.float64 import exact_llama_math
from tests.gradcheck import finite_difference

LAYER, HEAD = 1, 3  # under LLaMA's GQA (4 query heads, 2 KV heads) head 3 reads KV head 1


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    hf = tiny_hf_model(request.param)
    return request.param, hf, mechkit.load(hf)


def _uniform_causal(batch: int, seq: int) -> torch.Tensor:
    allowed = torch.ones(seq, seq).tril()
    return (allowed / allowed.sum(-1, keepdim=True)).expand(batch, seq, seq)


def _output_projection(hf, arch: str, z: torch.Tensor) -> torch.Tensor:
    """attn.out from per-head z [b, s, H, d_head], by hand."""
    flat = z.flatten(-2)
    if arch == "gpt2":
        proj = hf.transformer.h[LAYER].attn.c_proj  # Conv1D: x @ W + b
        return flat @ proj.weight + proj.bias
    return flat @ hf.model.layers[LAYER].self_attn.o_proj.weight.T


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_under_mechkit_attention_equal_eager(arch):
    hf = tiny_hf_model(arch)
    model = mechkit.load(hf)
    ids = tiny_ids()
    logits, cache = model.run_with_cache(ids, "blocks.*.attn.pattern")
    with torch.no_grad():
        eager = hf(ids, output_attentions=True)
    reference = eager.logits if hasattr(eager, "logits") else eager.last_hidden_state
    assert torch.equal(logits, reference)
    for layer, pattern in enumerate(eager.attentions):
        assert torch.equal(cache[f"blocks.{layer}.attn.pattern"], pattern)
    assert hf.config._attn_implementation == "eager"  # switched for the forward pass only


def test_replacing_the_pattern_with_itself_changes_nothing(pair):
    _, _, model = pair
    ids = tiny_ids()
    logits, clean = model.run_with_cache(ids, "blocks.*.attn.pattern")
    same = model.run_with_interventions(ids, {s: Replace(source=clean) for s in clean}).logits
    assert (same - logits).abs().max() <= 1e-6


def test_a_uniform_pattern_for_one_head_equals_the_hand_computed_head(pair):
    """z_h = the uniform average of v_h over the keys each query may see, then the output projection."""
    arch, hf, model = pair
    ids = tiny_ids()
    b, s = ids.shape
    site = f"blocks.{LAYER}"
    _, clean = model.run_with_cache(ids, [f"{site}.attn.v", f"{site}.attn.z"])
    kv_head = HEAD // (model.info.n_heads // model.info.n_kv_heads)
    uniform = _uniform_causal(b, s)
    z_head = uniform @ clean[f"{site}.attn.v"][:, :, kv_head]  # [b, s, d_head]
    z = clean[f"{site}.attn.z"].clone()
    z[:, :, HEAD] = z_head
    edit = {f"{site}.attn.pattern.h{HEAD}": Replace(source=uniform.clone())}
    logits, edited = model.run_with_interventions(ids, edit, cache=[f"{site}.attn.out", f"{site}.attn.pattern"])
    torch.testing.assert_close(edited[f"{site}.attn.pattern.h{HEAD}"], uniform, atol=0, rtol=0)
    torch.testing.assert_close(edited[f"{site}.attn.out"], _output_projection(hf, arch, z), atol=1e-5, rtol=0)
    by_z = model.run_with_interventions(ids, {f"{site}.attn.z.h{HEAD}": Replace(source=z_head)}).logits
    assert (logits - by_z).abs().max() <= 1e-6


def test_pattern_gradients_equal_finite_differences():
    with exact_llama_math():
        model = mechkit.load(tiny_hf_model("llama").double())
        ids = tiny_ids(batch=2, seq=5)

        def metric(logits, batch):
            return logits[:, -1, 3].sum() - logits[:, 2, 7].sum()

        sites = ["blocks.0.attn.pattern", "blocks.1.attn.pattern"]
        result = model.gradients(ids, sites, metric)
        for site in sites:
            act = result.activations[site]
            direction = torch.randn(act.shape, generator=torch.Generator().manual_seed(0), dtype=act.dtype)
            numeric = finite_difference(model, ids, site, act, direction, metric)
            torch.testing.assert_close((result.grads[site] * direction).sum(), numeric, atol=1e-7, rtol=1e-6)


def test_attention_implementation_is_restored_after_an_exception(pair):
    _, hf, model = pair

    def boom(act, site):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_interventions(tiny_ids(), {"blocks.0.attn.pattern": Apply(fn=boom)})
    assert {m.config._attn_implementation for m in hf.modules() if hasattr(m, "config")} == {"eager"}
    assert torch.equal(model(tiny_ids()), hf(tiny_ids()).logits)


def test_patterns_need_eager_attention():
    model = mechkit.load(tiny_hf_model("llama", attn_implementation="sdpa"))
    with pytest.raises(SiteNotSupportedError, match="eager"):
        model.run_with_cache(tiny_ids(), "blocks.0.attn.pattern")


def test_importing_mechkit_registers_nothing():
    code = (
        "import mechkit, mechkit.models.torch_hooks\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'mechkit_eager' not in AttentionInterface._global_mapping\n"
        "assert 'mechkit_eager' not in AttentionMaskInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_model_whose_eager_path_differs_loses_the_pattern_site():
    """GPT-2's reorder_and_upcast_attn runs its own eager path: checked at load, the site is refused."""
    hf = tiny_hf_model("gpt2", reorder_and_upcast_attn=True).to(torch.float16)
    model = mechkit.load(hf)
    with pytest.raises(SiteNotSupportedError, match="does not reproduce"):
        model.run_with_cache(tiny_ids(), "blocks.0.attn.pattern")
    assert torch.equal(model(tiny_ids()), hf(tiny_ids()).logits)
