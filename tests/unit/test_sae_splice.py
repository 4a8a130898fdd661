"""An SAE in the model, through the common site and intervention API: its latents are read,
ablated, clamped and patched as sites; gradients at latents are the decoder's pull-back of the
gradient at the site; steering along a decoder direction equals adding to that latent."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.interventions import Add, Replace, Zero
from mechkit.sae.directions import decoder_directions

SITE = "blocks.1.resid_post"
LATENTS, OUT = f"{SITE}.sae.latents", f"{SITE}.sae.out"
PROMPTS = ["Alice lives in the city of", "The red box is on the", "Bob"]


@pytest.fixture(scope="module")
def model_and_sae():
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    model = mechkit.load("zoo:facts-lm")
    d_in = model.run_with_cache("a", SITE).cache[SITE].shape[-1]
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=48, k=6)).eval()
    return model, sae


def _busiest_latent(model, sae):
    with model.splice(SITE, sae):
        z = model.run_with_cache(PROMPTS, LATENTS).cache[LATENTS]
    return int((z != 0).sum((0, 1)).argmax())


def test_latents_are_the_encoding_of_the_site_on_real_tokens(model_and_sae):
    model, sae = model_and_sae
    batch = model.tokenize(PROMPTS)
    clean = model.run_with_cache(batch, SITE)
    with model.splice(SITE, sae):
        spliced = model.run_with_cache(batch, [LATENTS, OUT])
    real = batch.attention_mask.bool()
    with torch.no_grad():
        expected = sae.encode(clean.cache[SITE])
    assert torch.allclose(spliced.cache[LATENTS][real], expected[real], atol=1e-5)
    assert torch.allclose(spliced.logits[real], clean.logits[real], atol=1e-5)  # the error term keeps it exact


def test_ablating_clamping_and_patching_one_latent(model_and_sae):
    model, sae = model_and_sae
    i = _busiest_latent(model, sae)
    batch = model.tokenize(PROMPTS)
    w = decoder_directions(sae, i)[0]
    with model.splice(SITE, sae):
        base = model.run_with_cache(batch, [LATENTS, OUT]).cache
        ablated = model.run_with_interventions(batch, {LATENTS: Zero(features=[i])}, cache=[OUT]).cache
        clamp = torch.zeros(sae.cfg.d_sae).index_fill_(0, torch.tensor([i]), 3.0)
        clamped = model.run_with_interventions(batch, {LATENTS: Replace(source=clamp, features=[i])}, cache=[OUT]).cache
    z = base[LATENTS][..., i:i + 1]
    real = batch.attention_mask.bool()
    # out = decode(z) + error and decode is affine: editing latent i moves the site along W_dec[i]
    assert torch.allclose(ablated[OUT][real], (base[OUT] - z * w)[real], atol=1e-4)
    assert torch.allclose(clamped[OUT][real], (base[OUT] + (3.0 - z) * w)[real], atol=1e-4)
    # patching latent i at each row's last real token from another run's cache
    other = model.tokenize(["Carol works at the", "The blue cup is in the", "Dan"])
    with model.splice(SITE, sae):
        source = model.run_with_cache(other, [LATENTS]).cache
        patched = model.run_with_interventions(
            batch, {LATENTS: Replace(source=source, features=[i], positions="last")}, cache=[LATENTS]).cache
    last_b, last_o = batch.attention_mask.sum(1) - 1, other.attention_mask.sum(1) - 1
    rows = torch.arange(len(PROMPTS))
    assert torch.equal(patched[LATENTS][rows, last_b, i], source[LATENTS][rows, last_o, i])
    assert torch.equal(patched[LATENTS][..., :i], base[LATENTS][..., :i])


def test_gradients_at_latents_are_the_decoder_pullback(model_and_sae):
    model, sae = model_and_sae
    batch = model.tokenize(PROMPTS)
    target = batch.input_ids[:, 0]

    def metric(logits, batch):
        return logits[:, -1].log_softmax(-1).gather(1, target[:, None]).sum()

    with model.splice(SITE, sae):
        grads = model.gradients(batch, [LATENTS, OUT], metric)
    expected = grads.grads[OUT] @ decoder_directions(sae).T
    assert torch.allclose(grads.grads[LATENTS], expected, atol=1e-5)
    assert grads.grads[LATENTS].abs().sum() > 0


def test_decoder_directions_follow_the_decoder_norm_rescaling(model_and_sae):
    _, sae = model_and_sae
    assert sae.cfg.rescale_acts_by_decoder_norm  # sae-lens's training default
    raw = sae.W_dec.detach()
    assert torch.allclose(decoder_directions(sae), raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(decoder_directions(sae, [3, 1]), decoder_directions(sae)[[3, 1]])


def test_steering_along_a_decoder_direction_equals_adding_to_the_latent(model_and_sae):
    model, sae = model_and_sae
    i = _busiest_latent(model, sae)
    batch = model.tokenize(PROMPTS)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    steered = model.run_with_interventions(batch, {SITE: Add(vector=decoder_directions(sae, i)[0], coeff=4.0)}).logits
    one_hot = torch.zeros(sae.cfg.d_sae).index_fill_(0, torch.tensor([i]), 1.0)
    with model.splice(SITE, sae):
        via_latent = model.run_with_interventions(batch, {LATENTS: Add(vector=one_hot, coeff=4.0)}).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(steered[real], via_latent[real], atol=1e-4)
    assert not torch.allclose(steered[real], model(batch)[real], atol=1e-3)
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items())
    assert not model._splices  # removed after the block
