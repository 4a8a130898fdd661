"""SAE metrics against hand computations; training through sae-lens: a planted dictionary recovered by
TopK, every architecture deterministic and resumed bit-identically after a killed run, the progress
bar's live figures, activations taken from a model (real tokens only); splicing a trained SAE in."""

from __future__ import annotations

import math
import re
import shutil
from types import SimpleNamespace

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
from mechkit.sae import train as train_module
from mechkit.sae.config import ARCHITECTURES
from mechkit.sae.source import model_activations
from mechkit.sae.train import LiveFigures, batch_fvu, latest_checkpoint
from tests.conftest import tiny_hf_model, tiny_ids

SITE = "blocks.0.resid_post"


def planted(n: int = 4096, d: int = 32, m: int = 64, active: int = 3, seed: int = 0):
    """Rows that are sparse non-negative combinations of ``m`` random unit directions, and the directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    index = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, m).scatter_(1, index, torch.rand(n, active, generator=g) + 0.5)
    return coef @ directions, directions


def small_topk(x: torch.Tensor, seed: int = 0, tokens: int = 200_000):
    return train_sae(x, d_sae=128, k=3, tokens=tokens, batch_size=1024, lr=3e-3, seed=seed, progress=False)


def max_cosines(directions: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """For each true direction, its largest cosine to a decoder row."""
    return (directions @ torch.nn.functional.normalize(decoder.detach(), dim=1).T).max(1).values


@pytest.fixture(scope="module")
def trained():
    x, directions = planted(n=100_000)  # 64 directions in 32 dimensions, 3 active per row
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
def test_topk_sae_recovers_a_planted_dictionary(trained):
    x, directions, sae = trained
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    assert l0(z) == 3.0
    assert fvu(x, x_hat) < 0.1
    assert cosine(x, x_hat) > 0.95
    # every planted direction has a decoder row close to it (0.989 here); random rows reach ≈ 0.5
    assert max_cosines(directions, sae.W_dec).mean() >= 0.9
    control = torch.randn(128, 32, generator=torch.Generator().manual_seed(5))
    assert max_cosines(directions, control).mean() < 0.7


def test_training_is_deterministic_and_leaves_the_global_rng_alone(trained):
    x, _, sae = trained
    state = torch.random.get_rng_state()
    again = small_topk(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, p in sae.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
    other = small_topk(x, seed=1, tokens=2048)
    assert not torch.equal(other.W_dec, sae.W_dec)


ARCH_OPTIONS = dict(d_sae=32, k=4, l1_coefficient=0.1, l0_coefficient=0.1, tokens=8192, batch_size=256,
                    progress=False)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_through_its_sae_lens_class(noise, architecture):
    sae = train_sae(noise, architecture=architecture, **ARCH_OPTIONS)
    inference = {"batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}.get(architecture, architecture)
    assert sae.cfg.architecture() == inference  # BatchTopK SAEs are JumpReLU SAEs once trained
    assert sae.cfg.metadata.training_architecture == architecture
    with torch.no_grad():
        z = sae.encode(noise)
        assert sae.decode(z).shape == noise.shape and 0 < l0(z) < 32
    if architecture == "matryoshka_batchtopk":
        widths = sae.cfg.metadata.training_architecture_details["matryoshka_widths"]
        assert widths == [2, 8, 32] == list(TrainConfig(architecture=architecture, d_sae=32).widths)


def test_training_refuses_bad_input():
    x, _ = planted(n=1024)
    with pytest.raises(ConfigError, match=r"architecture='nope'.*topk, batchtopk, matryoshka_batchtopk"):
        train_sae(x, architecture="nope", tokens=512, batch_size=512)
    with pytest.raises(ConfigError, match="k="):
        train_sae(x, d_sae=8, k=9, tokens=512, batch_size=512)
    with pytest.raises(ConfigError, match=r"k=9.*batchtopk"):
        TrainConfig(architecture="batchtopk", d_sae=8, k=9)
    TrainConfig(architecture="standard", d_sae=8, k=9)  # k does not apply: no error
    with pytest.raises(ConfigError, match="matryoshka_widths applies to"):
        TrainConfig(architecture="topk", matryoshka_widths=[8, 16])
    with pytest.raises(ConfigError, match="strictly increasing"):
        TrainConfig(architecture="matryoshka_batchtopk", d_sae=64, matryoshka_widths=[16, 8])
    with pytest.raises(ConfigError, match="at most d_sae=64"):
        TrainConfig(architecture="matryoshka_batchtopk", d_sae=64, matryoshka_widths=[16, 128])
    assert TrainConfig(architecture="matryoshka_batchtopk", d_sae=64, matryoshka_widths=[8, 16]).widths == (8, 16, 64)
    with pytest.raises(ConfigError, match="dead_window"):
        TrainConfig(dead_window=0)
    with pytest.raises(ConfigError, match="l0_coefficient"):
        TrainConfig(architecture="jumprelu", l0_coefficient=-1.0)
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
    with pytest.raises(MechkitError, match="prompts= goes with a wrapped model"):
        train_sae(x, prompts=["a"], d_sae=8, k=2, tokens=512, batch_size=512)
    with pytest.raises(TypeError, match="TrainConfig"):
        train_sae(x, config={"d_sae": 8})
    assert TrainConfig(d_sae=8, k=2, tokens=512, batch_size=512).to_dict()["k"] == 2


def killed_after(monkeypatch, steps: int) -> None:
    """Make the next run's data iterator fail after ``steps`` batches, as a killed process would stop."""
    real = train_module._tensor_batches

    def dying(x, cfg):
        for i, batch in enumerate(real(x, cfg)):
            if i == steps:
                raise RuntimeError("killed")
            yield batch

    monkeypatch.setattr(train_module, "_tensor_batches", dying)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(noise, tmp_path, monkeypatch,
                                                                              architecture):
    options = dict(ARCH_OPTIONS, architecture=architecture, out_dir=str(tmp_path), n_checkpoints=3)
    full = train_sae(noise, **{**options, "out_dir": None, "n_checkpoints": 0})
    with monkeypatch.context() as patch:
        killed_after(patch, steps=20)  # of 32; checkpoints after 9, 17 and 25 steps
        with pytest.raises(RuntimeError, match="killed"):
            train_sae(noise, **options)
    assert latest_checkpoint(tmp_path).name == "4352"  # 17 steps of 256
    resumed = train_sae(noise, resume=True, **options)
    assert latest_checkpoint(tmp_path).name == "final_8192"
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for name, p in full.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    again = train_sae(noise, **{**options, "out_dir": None, "n_checkpoints": 0, "seed": 1})
    assert not torch.equal(again.W_dec, full.W_dec)  # the seed matters


def test_a_truncated_checkpoint_fails_clearly(noise, tmp_path):
    options = dict(d_sae=32, k=4, tokens=4096, batch_size=256, progress=False, out_dir=str(tmp_path))
    train_sae(noise, n_checkpoints=1, **options)
    final = latest_checkpoint(tmp_path)
    shutil.rmtree(final)  # as if killed after the intermediate checkpoint
    weights = latest_checkpoint(tmp_path) / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    where = re.escape(str(latest_checkpoint(tmp_path)))
    with pytest.raises(MechkitError, match=f"cannot resume from the checkpoint {where}.*delete"):
        train_sae(noise, resume=True, **options)
    with pytest.raises(ConfigError, match="out_dir"):
        train_sae(noise, resume=True, **{**options, "out_dir": None})


# -- the progress bar ---------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_the_progress_bar_shows_live_l0_fvu_and_dead_fraction_and_is_silent_when_off(noise, capfd, architecture):
    train_sae(noise, architecture=architecture, d_sae=32, k=4, tokens=4096, batch_size=256, dead_window=512)
    err = capfd.readouterr().err
    assert "4096/4096" in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "L0=4.0" in last and "FVU=" in last and "dead/512=" in last  # k per row, or on average per batch
    train_sae(noise, architecture=architecture, d_sae=32, k=4, tokens=4096, batch_size=256, progress=False)
    assert capfd.readouterr() == ("", "")


def test_live_figures_follow_the_trainers_counts_and_the_metric_functions():
    x, _ = planted(n=2048)
    sae = small_topk(x, tokens=2048)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    assert batch_fvu(x, x_hat) == pytest.approx(fvu(x, x_hat), rel=1e-5)
    step = SimpleNamespace(sae_in=x, sae_out=x_hat)
    trainer = SimpleNamespace(act_freq_scores=torch.tensor([30.0, 10.0]), n_frac_active_samples=10,
                              dead_neurons=torch.tensor([True, False, False, False]))
    live = LiveFigures()
    assert live.update(trainer, step)["L0"] == 4.0 and live.update(trainer, step)["dead"] == 0.25
    trainer.act_freq_scores, trainer.n_frac_active_samples = torch.tensor([40.0, 30.0]), 20
    assert live.update(trainer, step)["L0"] == 3.0  # (70 − 40) firings over the 10 rows since the last update
    trainer.act_freq_scores, trainer.n_frac_active_samples = torch.tensor([8.0, 2.0]), 5  # a new sparsity window
    assert live.update(trainer, step)["L0"] == 2.0


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


def test_activations_from_a_model_are_its_real_tokens_only(tmp_path):
    model = mechkit.load(tiny_hf_model("gpt2"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 100, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (10,), generator=g)]
    # prompt by prompt there is no padding at all: the reference rows
    reference = torch.cat([model.run_with_cache([p], SITE).cache[SITE][0] for p in prompts])
    assert len(reference) == sum(map(len, prompts))
    in_memory = model_activations(model, prompts, SITE, batch_size=4)  # batches of 4 prompts, right-padded
    torch.testing.assert_close(in_memory, reference, atol=1e-5, rtol=0)
    store = model_activations(model, prompts, SITE, batch_size=4, store_dir=tmp_path / "store")
    torch.testing.assert_close(store[SITE].load(), reference, atol=1e-5, rtol=0)
    # train_sae(model, site, prompts=...) trains on exactly those rows
    options = dict(d_sae=32, k=4, tokens=256, batch_size=16, progress=False, collect_batch_size=4)
    from_model = train_sae(model, SITE, prompts=prompts, **options)
    from_rows = train_sae(in_memory, SITE, **options)
    for name, p in from_rows.state_dict().items():
        assert torch.equal(p, from_model.state_dict()[name]), name
    with pytest.raises(MechkitError, match=r"needs site= .* and prompts="):
        train_sae(model, SITE, **options)
    with pytest.raises(MechkitError, match="non-empty list"):
        model_activations(model, "one text", SITE)
    with pytest.raises(MechkitError, match="exactly one"):
        model_activations(model, prompts, "blocks.*.resid_post")
