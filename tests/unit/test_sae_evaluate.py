"""SAE evaluation in the model: CE-loss recovered against both baselines is exact for a perfect
reconstruction and zero for one that equals the baseline; reconstruction figures equal the pure
functions on the real-token activations; padded batches give what prompt-by-prompt runs give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.sae import functional as F
from mechkit.sae.evaluate import evaluate_sae
from mechkit.sae.result import SAEEvalResult, SAESweepResult, pareto_front
from mechkit.sae.sweep import sae_sweep
from mechkit.sae.train import train_sae
from mechkit.tasks import TaskSet

SITE = "blocks.1.resid_post"


class Constant:
    """Latents = the input; the reconstruction is ``value`` (None: the input itself)."""

    def __init__(self, d: int, value: torch.Tensor | None = None):
        self.cfg = SimpleNamespace(d_sae=d)
        self.value = value

    def encode(self, x):
        return x

    def decode(self, z):
        return z if self.value is None else self.value.expand_as(z).clone()


@pytest.fixture(scope="module")
def setup():
    model = mechkit.load("zoo:facts-lm")
    prompts = TaskSet.from_jsonl("probes/truth_medium.jsonl").prompts[:24]
    rows = [model.run_with_cache(p, SITE).cache[SITE][0] for p in prompts]  # prompt by prompt: no padding
    return model, prompts, torch.cat(rows)


def test_perfect_mean_and_zero_reconstructions(setup):
    model, prompts, x = setup
    d = x.shape[1]
    perfect = evaluate_sae(model, Constant(d), SITE, prompts, progress=False)
    assert perfect.recovered_zero == pytest.approx(1.0, abs=1e-5)
    assert perfect.recovered_mean == pytest.approx(1.0, abs=1e-5)
    assert perfect.kl < 1e-6 and perfect.fvu < 1e-10 and perfect.cosine == pytest.approx(1.0)
    assert perfect.ce_zero > perfect.ce_clean + 0.5 and perfect.ce_mean > perfect.ce_clean + 0.5  # both hurt
    zero = evaluate_sae(model, Constant(d, torch.zeros(d)), SITE, prompts, progress=False)
    assert zero.recovered_zero == pytest.approx(0.0, abs=1e-5) and zero.kl > 0.1
    # reconstructing every token as the set's mean is exactly the mean-ablation baseline
    mean = evaluate_sae(model, Constant(d, x.double().mean(0).float()), SITE, prompts, progress=False)
    assert mean.recovered_mean == pytest.approx(0.0, abs=1e-4)
    assert mean.fvu == pytest.approx(1.0, abs=1e-5)


def test_reconstruction_figures_equal_the_pure_functions(setup):
    model, prompts, x = setup
    sae = train_sae(x, d_sae=64, k=4, tokens=8192, batch_size=128, progress=False)
    result = evaluate_sae(model, sae, SITE, prompts, batch_size=7, progress=False)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    assert result.n_tokens == x.shape[0]
    assert result.l0 == pytest.approx(F.l0(z), rel=1e-6)
    assert result.fvu == pytest.approx(F.fvu(x, x_hat), rel=1e-4)
    assert result.cosine == pytest.approx(F.cosine(x, x_hat), rel=1e-5)
    freq = F.firing_frequency([z])
    assert torch.allclose(result.firing_frequency.double(), freq, atol=1e-6)
    assert result.dead_fraction == pytest.approx(F.dead_fraction(freq))
    assert result.dense_fraction == pytest.approx(F.dense_fraction(freq))
    window = evaluate_sae(model, sae, SITE, prompts, batch_size=7, dead_window=10, progress=False)
    assert window.dead_window == 10
    assert torch.allclose(window.firing_frequency.double(), F.firing_frequency([z[:10]]), atol=1e-6)


def test_padded_batches_equal_prompt_by_prompt(setup):
    model, prompts, x = setup
    assert len({len(model.tokenize(p).input_ids[0]) for p in prompts}) > 1
    sae = Constant(x.shape[1], torch.full((x.shape[1],), 0.1))
    batched = evaluate_sae(model, sae, SITE, prompts, batch_size=8, progress=False)
    single = evaluate_sae(model, sae, SITE, prompts, batch_size=1, progress=False)
    for key, value in batched.metrics().items():
        assert value == pytest.approx(getattr(single, key), rel=1e-5, abs=1e-6), key


def test_skipped_first_tokens_are_left_alone_and_not_counted(setup):
    model, prompts, x = setup
    d = x.shape[1]
    lengths = [len(model.tokenize(p).input_ids[0]) for p in prompts]
    perfect_but_first = evaluate_sae(model, Constant(d, torch.zeros(d)), SITE, prompts, skip_first=1, progress=False)
    assert perfect_but_first.n_tokens == sum(lengths) - len(prompts)
    zero_all = evaluate_sae(model, Constant(d, torch.zeros(d)), SITE, prompts, progress=False)
    # zeroing all but the first token is the zero baseline of that run: recovered 0 against it
    assert perfect_but_first.recovered_zero == pytest.approx(0.0, abs=1e-5)
    assert perfect_but_first.ce_zero != pytest.approx(zero_all.ce_zero)
    batched = evaluate_sae(model, Constant(d, torch.full((d,), 0.1)), SITE, prompts, skip_first=2, batch_size=8,
                           progress=False)
    single = evaluate_sae(model, Constant(d, torch.full((d,), 0.1)), SITE, prompts, skip_first=2, batch_size=1,
                          progress=False)
    for key, value in batched.metrics().items():
        assert value == pytest.approx(getattr(single, key), rel=1e-5, abs=1e-6), key
    with pytest.raises(MechkitError, match="no tokens left"):
        evaluate_sae(model, Constant(d), SITE, prompts, skip_first=100, progress=False)


def test_result_round_trip_and_plot(setup, tmp_path):
    model, prompts, x = setup
    result = evaluate_sae(model, Constant(x.shape[1]), SITE, prompts[:4], progress=False)
    result.save(tmp_path / "eval")
    loaded = SAEEvalResult.load(tmp_path / "eval")
    assert loaded.equals(result)
    assert list(result.to_frame()["fvu"]) == [result.fvu]
    assert result.plot() is not None


def test_pareto_front():
    cost = [1, 2, 3, 4, 5]
    fvu = [0.5, 0.6, 0.3, 0.35, 0.1]
    assert pareto_front(cost, fvu, higher_is_better=False) == [0, 2, 4]
    assert pareto_front(cost, [0.1, 0.2, 0.15, 0.9, 0.8], higher_is_better=True) == [0, 1, 3]


def test_sweep_over_k(setup, tmp_path):
    model, prompts, x = setup
    result = sae_sweep(x, SITE, model, prompts[:8], {"k": [2, 8]},
                       config=mechkit.sae.TrainConfig(d_sae=64, tokens=4096, batch_size=128, progress=False),
                       eval_config=mechkit.sae.EvalConfig(progress=False))
    assert [s["k"] for s in result.settings] == [2, 8]
    assert result.l0[0] <= 2 + 1e-9 and result.l0[1] <= 8 + 1e-9 and result.fvu[1] < result.fvu[0]
    frame = result.to_frame()
    assert frame["pareto_fvu"].all()  # more latents per token reconstructs better: both on the front
    result.save(tmp_path / "sweep")
    assert SAESweepResult.load(tmp_path / "sweep").equals(result)
    assert len(result.plot().axes) == 2
    with pytest.raises(MechkitError, match="unknown training options"):
        sae_sweep(x, SITE, model, prompts, {"kk": [1]})


def test_bad_input(setup):
    model, prompts, x = setup
    with pytest.raises(MechkitError, match="no prompts"):
        evaluate_sae(model, Constant(x.shape[1]), SITE, [], progress=False)
    with pytest.raises(mechkit.config.ConfigError, match="dense_threshold"):
        evaluate_sae(model, Constant(x.shape[1]), SITE, prompts, dense_threshold=2.0)
    with pytest.raises(MechkitError, match="latents"):
        evaluate_sae(model, object(), SITE, prompts, progress=False)


@pytest.mark.parametrize("backend", ["lens", "nnsight"])
def test_every_backend_gives_the_same_evaluation(setup, backend):
    model, prompts, x = setup
    sae = Constant(x.shape[1], torch.full((x.shape[1],), 0.1))
    reference = evaluate_sae(model, sae, SITE, prompts[:8], batch_size=4, progress=False)
    other = evaluate_sae(mechkit.load("zoo:facts-lm", backend=backend), sae, SITE, prompts[:8], batch_size=4,
                         progress=False)
    for key, value in reference.metrics().items():
        assert getattr(other, key) == pytest.approx(value, rel=1e-4, abs=1e-5), key
