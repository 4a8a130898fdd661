"""mechkit's SAE metric functions against sae-lens's own evaluation functions (``sae_lens.evals``) on
the same SAE, model and tokens: L0, explained variance / FVU, cosine, firing frequency (and the dead
and dense fractions read from it), KL to the clean run and CE-loss recovered against zero ablation.

The model is a tiny seeded TransformerLens HookedTransformer (what sae-lens's evals run on), wrapped
by mechkit for its side; the tokens have no padding, the one case where both count the same tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sae_lens.evals import get_downstream_reconstruction_metrics, get_recons_loss, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler

import mechkit
from mechkit.interventions import Zero
from mechkit.sae import functional as F
from mechkit.sae.evaluate import next_token_loss
from mechkit.sae.train import train_sae
from tests.conftest import VOCAB, tiny_ids

SITE, HOOK = "blocks.0.resid_post", "blocks.0.hook_resid_post"  # mechkit's name and TransformerLens's


@pytest.fixture(scope="module")
def setup():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=VOCAB, n_ctx=16,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    ht = HookedTransformer(cfg).eval()
    model = mechkit.load(ht)
    tokens = tiny_ids(batch=24, seq=12)
    # a briefly trained SAE: some latents never fire and some are dense, so every figure is non-trivial
    sae = train_sae(model, SITE, prompts=tokens.tolist(), d_sae=256, k=6, tokens=2048, batch_size=64, progress=False)
    sae.cfg.metadata.hook_name = HOOK  # sae-lens's evals find the site through the SAE's metadata
    store = SimpleNamespace(get_batch_tokens=lambda n: tokens[:n])  # what sae-lens's evals ask a store for
    return ht, model, sae, tokens, store


def test_sparsity_and_variance_metrics_equal_sae_lens(setup):
    ht, model, sae, tokens, store = setup
    metrics, per_feature = get_sparsity_and_variance_metrics(
        sae, ht, store, ActivationScaler(), n_batches=1, compute_l2_norms=False, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=len(tokens), model_kwargs={})
    x = model.run_with_cache(tokens, SITE).cache[SITE]
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    assert F.l0(z) == pytest.approx(metrics["l0"], rel=1e-6)
    assert F.explained_variance(x, x_hat) == pytest.approx(metrics["explained_variance"], rel=1e-5)
    assert F.fvu(x, x_hat) == pytest.approx(1 - metrics["explained_variance"], rel=1e-5)
    assert F.cosine(x, x_hat) == pytest.approx(metrics["cossim"], rel=1e-5)
    freq = F.firing_frequency([z])
    density = torch.tensor(per_feature["feature_density"], dtype=torch.float64)
    torch.testing.assert_close(freq, density, rtol=0, atol=1e-7)
    assert 0 < F.dead_fraction(freq) < 1 and 0 < F.dense_fraction(freq) < 1
    assert F.dead_fraction(freq) == float((density == 0).double().mean())
    assert F.dense_fraction(freq) == float((density > 0.1).double().mean())


def test_kl_and_ce_loss_recovered_equal_sae_lens(setup):
    ht, model, sae, tokens, store = setup
    reference = get_recons_loss(sae, ht, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True)
    scores = get_downstream_reconstruction_metrics(sae, ht, store, ActivationScaler(), compute_kl=True,
                                                   compute_ce_loss=True, n_batches=1,
                                                   eval_batch_size_prompts=len(tokens))
    clean = model(tokens)
    with model.splice(SITE, sae, keep_error=False):
        spliced = model(tokens)
    zeroed = model.run_with_interventions(tokens, {SITE: Zero()}).logits
    assert F.kl_divergence(clean, spliced) == pytest.approx(float(reference["kl_div_with_sae"].mean()), rel=1e-4)
    assert F.kl_divergence(clean, zeroed) == pytest.approx(float(reference["kl_div_with_ablation"].mean()), rel=1e-4)
    mask = torch.ones_like(tokens)
    ce = {name: next_token_loss(logits, tokens, mask) for name, logits in
          (("clean", clean), ("sae", spliced), ("zero", zeroed))}
    ce = {name: total / count for name, (total, count) in ce.items()}
    assert ce["clean"] == pytest.approx(scores["ce_loss_without_sae"], rel=1e-5)
    assert ce["sae"] == pytest.approx(scores["ce_loss_with_sae"], rel=1e-5)
    assert ce["zero"] == pytest.approx(scores["ce_loss_with_ablation"], rel=1e-5)
    recovered = F.ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"])
    assert 0 < recovered < 1
    assert recovered == pytest.approx(scores["ce_loss_score"], rel=1e-4)
