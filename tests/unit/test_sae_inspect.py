"""Feature inspection on facts-lm: top contexts equal a brute-force sort of every real token run
prompt by prompt (padding never counts), the HTML is escaped and scaled by activation, firing
frequencies equal the pure function, and logit effects equal the unembedding times the decoder rows."""

from __future__ import annotations

import re

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.results import Result
from mechkit.sae import functional as F
from mechkit.sae.inspect import activation_frequency, logit_effects, top_contexts
from mechkit.sae.train import train_sae
from mechkit.tasks import TaskSet

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def setup():
    model = mechkit.load("zoo:facts-lm")
    prompts = TaskSet.from_jsonl("probes/truth_medium.jsonl").prompts[:30]
    per_prompt = [model.run_with_cache(p, SITE).cache[SITE][0] for p in prompts]  # no padding
    assert len({a.shape[0] for a in per_prompt}) > 1  # mixed lengths: batches get padded
    sae = train_sae(torch.cat(per_prompt), d_sae=64, k=4, tokens=8192, batch_size=128, progress=False)
    return model, prompts, per_prompt, sae


def brute_force(sae, per_prompt, latent, k):
    """Every firing (activation, prompt, position), sorted by value then by token order."""
    entries = []
    with torch.no_grad():
        for p, acts in enumerate(per_prompt):
            z = sae.encode(acts)[:, latent]
            entries += [(-float(v), p, t) for t, v in enumerate(z) if v > 0]
    return sorted(entries)[:k]


TIE = 1e-4  # activations this close count as tied (padded and prompt-by-prompt runs round differently)


def _ranked(result, row):
    """A row's (activation, prompt, position) triples, prompts that fired only."""
    items = zip(result.activations[row].tolist(), result.prompt_index[row].tolist(), result.position[row].tolist())
    return [(a, p, t) for a, p, t in items if p >= 0]


def _same_up_to_ties(got, truth, value_of):
    """Equal top-k lists, except that tokens tied at the k-th value (e.g. the same word at the same
    position of two prompts) may be any of the tied ones: float rounding decides among them."""
    assert len(got) == len(truth)
    if not truth:
        return
    cut = min(v for v, _, _ in truth)
    above = sorted((p, t) for v, p, t in truth if v > cut + TIE)
    assert sorted((p, t) for v, p, t in got if v > cut + TIE) == above
    assert all(abs(value_of[(p, t)] - v) < TIE for v, p, t in got)  # every entry is a real firing


def test_top_contexts_equal_prompt_by_prompt_sort(setup):
    model, prompts, per_prompt, sae = setup
    k = 6
    result = top_contexts(model, sae, SITE, prompts, k=k, batch_size=7, window=(3, 2))
    single = top_contexts(model, sae, SITE, prompts, k=k, batch_size=1, window=(3, 2))
    assert torch.allclose(result.activations, single.activations, atol=1e-5)
    checked = 0
    for row, latent in enumerate(result.latents.tolist()):
        everything = brute_force(sae, per_prompt, latent, 10**9)
        expected = everything[:k]
        n = len(expected)
        truth = [(-v, p, t) for v, p, t in expected]
        for got in (_ranked(result, row), _ranked(single, row)):
            _same_up_to_ties(got, truth, {(p, t): -v for v, p, t in everything})
        assert torch.allclose(result.activations[row, :n], torch.tensor([-v for v, _, _ in expected]), atol=1e-5)
        assert (result.prompt_index[row, n:] == -1).all()  # fewer firing tokens than k: marked missing
        checked += n
    assert checked > 0
    # the window holds the prompt's tokens around the top token and the latent's activations there
    row, j = 0, 0
    while result.prompt_index[row, j] < 0:
        row += 1
    p, t = int(result.prompt_index[row, j]), int(result.position[row, j])
    ids = model.tokenize(prompts[p]).input_ids[0]
    with torch.no_grad():
        z = sae.encode(per_prompt[p])[:, int(result.latents[row])]
    for w, pos in enumerate(range(t - 3, t + 3)):
        if 0 <= pos < len(ids):
            assert int(result.context_ids[row, j, w]) == int(ids[pos])
            assert float(result.context_activations[row, j, w]) == pytest.approx(float(z[pos]), abs=1e-5)
        else:
            assert int(result.context_ids[row, j, w]) == -1
    freq = F.firing_frequency([sae.encode(a).detach() for a in per_prompt])
    assert torch.allclose(result.frequency.double(), freq, atol=1e-6)
    assert result.n_tokens == sum(a.shape[0] for a in per_prompt)


def test_html_is_escaped_and_scaled(setup, tmp_path):
    model, prompts, _, sae = setup
    result = top_contexts(model, sae, SITE, prompts, latents=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], k=3, window=4)
    latent = next(int(i) for r, i in enumerate(result.latents) if result.prompt_index[r, 0] >= 0)
    page = result.html(latent)
    assert "<bos>" not in page  # token text is escaped
    titles = [float(v) for v in re.findall(r'title="([^"]+)"', page)]
    alphas = [float(a) for a in re.findall(r"rgba\(255,120,0,([0-9.]+)\)", page)]
    row = int((result.latents == latent).nonzero()[0, 0])
    top = float(result.activations[row, 0])
    assert max(titles) == pytest.approx(top, rel=1e-3) and max(alphas) == pytest.approx(1.0)
    for value, alpha in zip(titles, alphas):
        assert alpha == pytest.approx(max(0.0, min(1.0, value / top)), abs=2e-3)
    assert page.count("text-decoration:underline") == int((result.prompt_index[row] >= 0).sum())
    assert result._repr_html_().count("<b>latent") == 8  # the first few latents, then a note
    frame = result.to_frame()
    assert set(frame["latent"]) <= set(result.latents.tolist()) and (frame["activation"] > 0).all()
    with pytest.raises(MechkitError, match="not in this result"):
        result.html(40)
    result.save(tmp_path / "top")
    assert Result.load(tmp_path / "top").equals(result)


def test_activation_frequency(setup, tmp_path):
    model, prompts, per_prompt, sae = setup
    result = activation_frequency(model, sae, SITE, prompts, batch_size=8)
    with torch.no_grad():
        expected = F.firing_frequency([sae.encode(a) for a in per_prompt])
    assert torch.allclose(result.frequency.double(), expected, atol=1e-6)
    assert result.dead_fraction == pytest.approx(F.dead_fraction(expected))
    assert int(result.to_frame()["dead"].sum()) == int((expected == 0).sum())
    assert result.plot().axes[0].get_title().endswith(f"over {result.n_tokens:,} tokens")
    result.save(tmp_path / "freq")
    assert Result.load(tmp_path / "freq").equals(result)


def test_logit_effects_equal_unembedding_times_decoder(setup):
    model, _, _, sae = setup
    result = logit_effects(model, sae, [3, 7, 11], k=5)
    w_u = model.torch_module.lm_head.weight.detach()  # [vocab, d_model]; the final norm is skipped
    for row, latent in enumerate([3, 7, 11]):
        effect = w_u @ sae.W_dec[latent].detach()
        assert torch.allclose(result.top_values[row], effect.sort(descending=True).values[:5], atol=1e-5)
        assert torch.allclose(result.bottom_values[row], effect.sort().values[:5], atol=1e-5)
        assert torch.allclose(effect[result.top_ids[row]], result.top_values[row], atol=1e-5)
    frame = result.to_frame()
    token = model.tokenizer.decode([int(result.top_ids[0, 0])])
    assert frame.iloc[0]["token"] == token and len(frame) == 3 * 2 * 5
    assert result.plot(latent=7) is not None


def test_bad_input(setup):
    model, prompts, _, sae = setup
    with pytest.raises(MechkitError, match="latents must be indices"):
        top_contexts(model, sae, SITE, prompts, latents=[64])
    with pytest.raises(MechkitError, match="non-empty list"):
        top_contexts(model, sae, SITE, "one prompt")
    with pytest.raises(MechkitError, match="exactly one"):
        activation_frequency(model, sae, "blocks.*.resid_post", prompts)
