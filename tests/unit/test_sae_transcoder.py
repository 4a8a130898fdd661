"""A transcoder spliced from an MLP's input to its output: the target site becomes the transcoder's
output of the same run's source; with the error kept the run is unchanged; editing a latent moves the
target along that latent's decoder row."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.sae.transcoder import splice_transcoder

SOURCE, TARGET = "blocks.1.mlp.in", "blocks.1.mlp.out"


@pytest.fixture(scope="module")
def model_and_transcoder():
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    model = mechkit.load("zoo:facts-lm")
    d = model.run_with_cache("a", SOURCE).cache[SOURCE].shape[-1]
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_in=d, d_sae=64, d_out=d, apply_b_dec_to_input=False))
    with torch.no_grad():
        tc.W_enc.normal_(0, 0.2)
        tc.W_dec.normal_(0, 0.2)
    return model, tc.eval()


def test_target_is_the_transcoder_of_the_source(model_and_transcoder):
    model, tc = model_and_transcoder
    batch = model.tokenize(["Alice lives in the city of", "Bob"])
    clean = model.run_with_cache(batch, [SOURCE, TARGET])
    with torch.no_grad():
        expected = tc.decode(tc.encode(clean.cache[SOURCE]))
    with splice_transcoder(model, tc, SOURCE, TARGET) as handle:
        spliced = model.run_with_cache(batch, [TARGET])
    real = batch.attention_mask.bool()
    assert torch.allclose(spliced.cache[TARGET][real], expected[real], atol=1e-5)
    assert handle.latents.shape[-1] == 64
    replaced = model.run_with_interventions(batch, {TARGET: Replace(source=expected)}).logits
    assert torch.allclose(spliced.logits[real], replaced[real], atol=1e-5)
    with splice_transcoder(model, tc, SOURCE, TARGET, keep_error=True):
        kept = model(batch)
    assert torch.allclose(kept[real], clean.logits[real], atol=1e-5)
    assert not model._context_writes  # removed after the block


def test_editing_a_latent_moves_the_target_along_its_decoder_row(model_and_transcoder):
    model, tc = model_and_transcoder
    batch = model.tokenize(["The red box is on the"])

    def clamp(z):
        z = z.clone()
        z[..., 3] = 2.0
        return z

    with splice_transcoder(model, tc, SOURCE, TARGET) as handle:
        base = model.run_with_cache(batch, [TARGET]).cache[TARGET]
        z = handle.latents[..., 3:4]
    with splice_transcoder(model, tc, SOURCE, TARGET, edit=clamp):
        edited = model.run_with_cache(batch, [TARGET]).cache[TARGET]
    assert torch.allclose(edited, base + (2.0 - z) * tc.W_dec[3].detach(), atol=1e-5)


def test_bad_transcoders(model_and_transcoder):
    model, tc = model_and_transcoder
    with pytest.raises(MechkitError, match="encode and decode"), splice_transcoder(model, object(), SOURCE, TARGET):
        pass
    with pytest.raises(MechkitError, match="one site"), splice_transcoder(model, tc, "blocks.*.mlp.in", TARGET):
        pass
