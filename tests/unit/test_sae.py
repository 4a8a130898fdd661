"""SAE metrics against hand computations; TopK training through sae-lens on a planted dictionary;
determinism; splicing a trained SAE into a model."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import mechkit
from mechkit.activations.collect import collect
from mechkit.config import ConfigError
from mechkit.errors import MechkitError
from mechkit.sae import (
    TrainConfig,
    ce_loss_recovered,
    cosine,
    dead_fraction,
    dense_fraction,
    explained_variance,
    firing_frequency,
    fvu,
    kl_divergence,
    l0,
    train_sae,
)
from mechkit.sae.train import latest_checkpoint
from tests.conftest import tiny_hf_model, tiny_ids

SITE = "blocks.0.resid_post"


def planted(n: int = 4096, d: int = 32, m: int = 64, active: int = 4, seed: int = 0):
    """Rows that are sparse non-negative combinations of ``m`` random unit directions, and the directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    index = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, m).scatter_(1, index, torch.rand(n, active, generator=g) + 0.5)
    return coef @ directions, directions


def small_topk(x: torch.Tensor, seed: int = 0, tokens: int = 200_000):
    return train_sae(x, d_sae=128, k=4, tokens=tokens, batch_size=512, lr=3e-3, seed=seed, progress=False)


@pytest.fixture(scope="module")
def trained():
    x, directions = planted()
    return x, directions, small_topk(x)


# -- metrics ------------------------------------------------------------------------------------
def test_l0_counts_active_latents_per_token():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, -3.0]])
    assert l0(z) == 1.5
    assert l0(z.reshape(1, 2, 3)) == 1.5
    assert l0(z, threshold=1.5) == 1.0


def test_fvu_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); Σ‖x − mean‖² = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # Σ‖x − x̂‖² = 2
    assert fvu(x, x_hat) == pytest.approx(0.5)
    assert explained_variance(x, x_hat) == pytest.approx(0.5)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0)


def test_cosine_is_the_mean_over_tokens():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    x_hat = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # cosines 0 and 1
    assert cosine(x, x_hat) == pytest.approx(0.5)


def test_firing_frequency_and_dead_and_dense_fractions():
    batches = [torch.tensor([[1.0, 0.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]])]
    freq = firing_frequency(iter(batches))
    torch.testing.assert_close(freq, torch.tensor([1.0, 0.0, 1 / 3, 1 / 3], dtype=torch.float64))
    assert dead_fraction(freq) == 0.25
    assert dense_fraction(freq) == 0.75
    assert dense_fraction(freq, threshold=0.5) == 0.25
    assert dead_fraction(freq, threshold=0.4) == 0.75


def test_ce_loss_recovered_and_kl():
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_ablated=7.0) == pytest.approx(0.9)
    assert ce_loss_recovered(2.0, 2.0, 7.0) == 1.0
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4), p = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(q, q) == pytest.approx(0.0, abs=1e-12)
    both = torch.cat([p, q]).unsqueeze(0)
    assert kl_divergence(both, torch.cat([q, q]).unsqueeze(0), mask=torch.tensor([[True, False]])) == \
        pytest.approx(expected)


def test_metrics_refuse_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(MechkitError, match="empty"):
        l0(torch.empty(0, 3))
    with pytest.raises(MechkitError, match="NaN"):
        fvu(x, torch.full((4, 3), float("nan")))
    with pytest.raises(MechkitError, match="shape"):
        cosine(x, torch.randn(4, 2))
    with pytest.raises(MechkitError, match="zero variance"):
        fvu(torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(MechkitError, match="no latent batches"):
        firing_frequency(iter([]))
    with pytest.raises(MechkitError, match="latents"):
        firing_frequency(iter([torch.ones(2, 3), torch.ones(2, 4)]))
    with pytest.raises(MechkitError, match="undefined"):
        ce_loss_recovered(2.0, 3.0, 2.0)


# -- training -----------------------------------------------------------------------------------
def test_topk_sae_reconstructs_a_planted_dictionary(trained):
    x, directions, sae = trained
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
        decoder = torch.nn.functional.normalize(sae.W_dec, dim=1)
    assert l0(z) == 4.0
    assert fvu(x, x_hat) < 0.12  # 0.080 here
    assert cosine(x, x_hat) > 0.95
    # every planted direction has a decoder row close to it (0.997 here)
    assert (directions @ decoder.T).max(1).values.mean() > 0.95


def test_training_is_deterministic_and_leaves_the_global_rng_alone(trained):
    x, _, sae = trained
    state = torch.random.get_rng_state()
    again = small_topk(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, p in sae.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
    other = small_topk(x, seed=1, tokens=1024)
    assert not torch.equal(other.W_dec, sae.W_dec)


def test_standard_sae_trains():
    x, _ = planted(n=1024)
    sae = train_sae(x, architecture="standard", d_sae=64, l1_coefficient=0.1, tokens=2048, batch_size=512,
                    progress=False)
    with torch.no_grad():
        assert sae.decode(sae.encode(x)).shape == x.shape


def test_training_refuses_bad_input():
    x, _ = planted(n=1024)
    with pytest.raises(ConfigError, match="architecture"):
        train_sae(x, architecture="nope", tokens=512, batch_size=512)
    with pytest.raises(ConfigError, match="k="):
        train_sae(x, d_sae=8, k=9, tokens=512, batch_size=512)
    with pytest.raises(MechkitError, match="empty"):
        train_sae(torch.empty(0, 4), tokens=512, batch_size=1)
    with pytest.raises(MechkitError, match="NaN"):
        train_sae(torch.full((600, 4), float("nan")), d_sae=8, k=2, tokens=512, batch_size=512)
    with pytest.raises(MechkitError, match="float \\[n, d\\]"):
        train_sae(torch.ones(600), tokens=512, batch_size=512)
    with pytest.raises(MechkitError, match="fewer than one batch"):
        train_sae(x[:100], d_sae=8, k=2, tokens=512, batch_size=512)
    with pytest.raises(MechkitError, match="ActivationStore"):
        train_sae([[1.0]], tokens=512, batch_size=512)
    with pytest.raises(TypeError, match="TrainConfig"):
        train_sae(x, config={"d_sae": 8})
    assert TrainConfig(d_sae=8, k=2, tokens=512, batch_size=512).to_dict()["k"] == 2


def test_a_run_resumed_from_its_checkpoint_finishes_as_if_never_stopped(tmp_path):
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    options = dict(d_sae=32, k=4, tokens=8192, batch_size=256, progress=False)
    full = train_sae(x, **options)
    train_sae(x, out_dir=str(tmp_path), n_checkpoints=1, **options)
    final = latest_checkpoint(tmp_path)
    assert final is not None and final.name == "final_8192"
    shutil.rmtree(final)  # as if killed after the intermediate checkpoint
    assert latest_checkpoint(tmp_path).name == "4352"
    resumed = train_sae(x, out_dir=str(tmp_path), n_checkpoints=1, resume=True, **options)
    for name, p in full.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    weights = latest_checkpoint(tmp_path) / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(MechkitError, match="cannot resume from the checkpoint"):
        train_sae(x, out_dir=str(tmp_path), resume=True, **options)
    with pytest.raises(ConfigError, match="out_dir"):
        train_sae(x, resume=True, **options)


# -- in the model -------------------------------------------------------------------------------
def test_an_sae_trained_from_a_store_splices_in_exactly_with_its_error_term(tmp_path):
    model = mechkit.load(tiny_hf_model("gpt2"))
    prompts = tiny_ids(batch=8, seq=9).tolist()
    store = collect(model, prompts, [SITE], tmp_path / "store", batch_size=4, progress=False)
    sae = train_sae(store, site=SITE, d_sae=64, k=4, tokens=1024, batch_size=16, progress=False)
    assert sae.cfg.d_in == store[SITE].shape[1]
    with pytest.raises(MechkitError, match="site="):
        train_sae(store, d_sae=64, k=4, tokens=1024, batch_size=16)
    with pytest.raises(MechkitError, match="fewer than one batch"):
        train_sae(store, site=SITE, d_sae=64, k=4, tokens=1024, batch_size=1000)
    ids = tiny_ids()
    clean = model(ids)
    with model.splice(SITE, sae, keep_error=True):
        spliced, latents = model.run_with_cache(ids, f"{SITE}.sae.latents")
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
    assert latents[f"{SITE}.sae.latents"].shape == (*ids.shape, 64)
    assert l0(latents[f"{SITE}.sae.latents"]) <= 4
    with model.splice(SITE, sae, keep_error=False):
        assert not torch.allclose(model(ids), clean, atol=1e-5)
