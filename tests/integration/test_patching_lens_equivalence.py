"""Activation patching equals TransformerLens's ``transformer_lens.patching`` on the same
HookedTransformer (facts-lm's weights) and prompts — residual stream × position, head outputs over
all positions and per position — and all three mechkit backends give the same sweeps."""

from __future__ import annotations

import collections

import pytest
import torch

import mechkit
from mechkit import tasks
from mechkit.patching import PatchingPairs, logit_diff, make_pairs, recovery
from mechkit.patching.activation import activation_patching

pytest.importorskip("transformer_lens")
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    return mechkit.load("zoo:facts-lm")


@pytest.fixture(scope="module")
def hooked(reference):
    """A HookedTransformer holding facts-lm's weights, and mechkit's lens backend over that very object."""
    from mechkit.models.lens import LensModel, hooked_transformer_from_gpt2, hooked_transformer_from_llama

    hf = reference.torch_module
    if reference.info.architecture == "gpt2":
        ht = hooked_transformer_from_gpt2(hf)
    else:
        ht = hooked_transformer_from_llama(hf, n_ctx=hf.config.max_position_embeddings)
    return ht, LensModel(ht, tokenizer=reference.tokenizer)


@pytest.fixture(scope="module")
def pairs(reference):
    """Six IOI pairs of one length: TL runs tokens without an attention mask, so no padding."""
    every = make_pairs(reference, tasks.generate("ioi", 40, 0, corrupt="abc"))
    length = collections.Counter(every.lengths.tolist()).most_common(1)[0][0]
    chosen = every.select((every.lengths == length).nonzero().flatten()[:6])
    return PatchingPairs(chosen.clean, chosen.corrupt, chosen.answers, chosen.wrong, chosen.clean_prompts,
                         chosen.corrupt_prompts)


def test_equal_to_transformer_lens_patching(hooked, pairs):
    from transformer_lens import patching as tlp

    ht, lens = hooked
    tokens = pairs.corrupt.input_ids
    assert bool(pairs.clean.attention_mask.all())
    with torch.no_grad():
        clean_logits, clean_cache = ht.run_with_cache(pairs.clean.input_ids)
        clean = logit_diff(clean_logits, pairs).mean()
        corrupt = logit_diff(ht(tokens), pairs).mean()

    def metric(logits):  # the same normalised metric mechkit reports
        return recovery(logit_diff(logits, pairs).mean(), clean, corrupt).float()

    n_layers, n_heads, seq = ht.cfg.n_layers, ht.cfg.n_heads, tokens.shape[1]
    resid = activation_patching(lens, pairs, sites="blocks.*.resid_pre", progress=False)
    expected = tlp.get_act_patch_resid_pre(ht, tokens, clean_cache, metric)
    assert resid.scores.shape == expected.shape == (n_layers, seq)
    assert (resid.scores - expected).abs().max() <= TOL
    assert resid.clean == pytest.approx(float(clean), abs=1e-5)

    heads = activation_patching(lens, pairs, sites="blocks.*.attn.z", positions="all", progress=False)
    expected = tlp.get_act_patch_attn_head_out_all_pos(ht, tokens, clean_cache, metric)
    assert (heads.scores.reshape(n_layers, n_heads) - expected).abs().max() <= TOL

    by_pos = activation_patching(lens, pairs, sites="blocks.*.attn.z", progress=False)
    expected = tlp.get_act_patch_attn_head_out_by_pos(ht, tokens, clean_cache, metric)  # [layer, pos, head]
    mine = by_pos.scores.reshape(n_layers, n_heads, seq).permute(0, 2, 1)
    assert (mine - expected).abs().max() <= TOL
    assert expected.abs().max() > 0.1  # the sweep has effects to compare, not only zeros


def test_all_backends_agree(hooked, pairs):
    """torch_hooks, lens (TransformerBridge and the HookedTransformer) and nnsight, on equal and mixed lengths."""
    _, lens_ht = hooked
    mixed = make_pairs(lens_ht, tasks.generate("ioi", 5, 7, corrupt="abc"))
    assert len(set(mixed.lengths.tolist())) > 1
    backends = [lens_ht, *(mechkit.load("zoo:facts-lm", backend=b) for b in ("torch_hooks", "lens", "nnsight"))]
    sweeps = ({"sites": "blocks.*.resid_pre"}, {"sites": "blocks.*.attn.z", "positions": "all"},
              {"sites": "blocks.1.attn.z,blocks.3.attn.z", "positions": "last"})
    for data in (pairs, mixed):
        for sweep in sweeps:
            results = [activation_patching(m, data, progress=False, **sweep) for m in backends]
            for model, result in zip(backends[1:], results[1:]):
                assert result.labels == results[0].labels
                gap = (result.scores - results[0].scores).abs().max()
                assert gap <= TOL, (model.backend, sweep, float(gap))
    neurons = [activation_patching(m, mixed, sites="blocks.2.mlp.post", neurons=[3, 11], positions="last",
                                   normalized=False, progress=False) for m in backends]
    assert all(torch.allclose(r.scores, neurons[0].scores, atol=TOL) for r in neurons[1:])
