"""Intervention contexts unwind; splice points; metrics over sites; return types."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mechkit
from mechkit.errors import MechkitError
from mechkit.interventions import Add, ProjectOut, Zero
from mechkit.models.base import Run
from tests.conftest import tiny_hf_model, tiny_ids

SITE = "blocks.0.resid_post"


@pytest.fixture
def model():
    return mechkit.load(tiny_hf_model("gpt2"))


@pytest.fixture
def model64():
    return mechkit.load(tiny_hf_model("gpt2").double())


def test_nested_and_interleaved_contexts_unwind(model):
    ids = tiny_ids()
    clean = model(ids)
    v1, v2 = torch.ones(32), torch.ones(32)  # equal values: removal must be by identity
    with model.intervene({SITE: Add(vector=v1)}):
        one = model(ids)
        with model.intervene({SITE: Add(vector=v2)}):
            two = model(ids)
        torch.testing.assert_close(model(ids), one)
    assert not torch.allclose(one, two)
    torch.testing.assert_close(model(ids), clean, atol=0, rtol=0)
    # interleaved: enter a, enter b, exit a, exit b
    a, b = model.intervene({SITE: Add(vector=v1)}), model.intervene({SITE: Add(vector=v2)})
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    torch.testing.assert_close(model(ids), one)
    b.__exit__(None, None, None)
    torch.testing.assert_close(model(ids), clean, atol=0, rtol=0)


def test_contexts_unwind_on_exceptions(model):
    ids = tiny_ids()
    clean = model(ids)
    with pytest.raises(RuntimeError, match="boom"), model.intervene({SITE: Zero()}), \
            model.splice(SITE, nn.Identity(), name="id"):
        raise RuntimeError("boom")
    assert model._context_writes == [] and model._splices == []
    torch.testing.assert_close(model(ids), clean, atol=0, rtol=0)


def test_write_that_never_fires_is_an_error():
    model = mechkit.load(tiny_hf_model("gpt2"))
    # the MLM-less GPT-2 has a dropout module that is on the path; the wte of another model is not
    extra = nn.Linear(2, 2)
    model.module.add_module("unused_head", extra)
    with pytest.raises(MechkitError, match="module:unused_head never ran"):
        model.run_with_interventions(tiny_ids(), {"module:unused_head": Zero()})


def test_run_with_interventions_always_returns_run(model):
    out = model.run_with_interventions(tiny_ids(), {SITE: Zero()})
    assert isinstance(out, Run) and len(out.cache) == 0
    logits, cache = model.run_with_interventions(tiny_ids(), {SITE: Zero()}, cache=SITE)
    assert SITE in cache and logits.shape[:2] == (3, 7)


class TinySAE(nn.Module):
    def __init__(self, d=32, n=48, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Parameter(torch.randn(d, n, generator=g) / d**0.5)
        self.dec = nn.Parameter(torch.randn(n, d, generator=g) / n**0.5)

    def encode(self, x):
        return torch.relu(x @ self.enc.to(x.dtype))

    def decode(self, z):
        return z @ self.dec.to(z.dtype)


def test_identity_splice_leaves_logits_unchanged(model):
    ids = tiny_ids()
    clean = model(ids)
    with model.splice(SITE, nn.Identity(), name="id"):
        torch.testing.assert_close(model(ids), clean, atol=1e-6, rtol=0)
    with model.splice(SITE, TinySAE()):  # with its error term, an SAE splice is exact too
        logits, cache = model.run_with_cache(ids, [f"{SITE}.sae.latents", f"{SITE}.sae.error", f"{SITE}.sae.recon"])
        torch.testing.assert_close(logits, clean, atol=1e-5, rtol=0)
    assert cache[f"{SITE}.sae.latents"].shape == (3, 7, 48)


def test_splice_parts_are_readable_writable_and_globbable(model):
    ids = tiny_ids()
    sae = TinySAE()
    _, base = model.run_with_cache(ids, SITE)
    with model.splice(SITE, sae):
        names = [str(s) for s in model.resolve(f"{SITE}.sae.*")]
        assert names == [f"{SITE}.sae.{p}" for p in ("in", "latents", "recon", "error", "out")]
        _, cache = model.run_with_interventions(ids, {f"{SITE}.sae.latents": Zero(features=[3, 5])},
                                                cache=[SITE, f"{SITE}.sae.latents", f"{SITE}.sae.error"])
    x = base[SITE]
    z = sae.encode(x)
    z[..., [3, 5]] = 0
    expected = sae.decode(z) + (x - sae.decode(sae.encode(x)))
    torch.testing.assert_close(cache[SITE], expected, atol=1e-5, rtol=0)
    assert torch.all(cache[f"{SITE}.sae.latents"][..., [3, 5]] == 0)
    with pytest.raises(mechkit.errors.UnknownSiteError, match="no module is spliced"):
        model.run_with_cache(ids, f"{SITE}.sae.latents")


def test_gradients_at_spliced_latents_equal_finite_differences(model64):
    model = model64
    ids = tiny_ids(batch=2, seq=5)
    sae = TinySAE().double()
    part = f"{SITE}.sae.latents"

    def metric(logits, batch):
        return logits[:, -1, 7].sum()

    with model.splice(SITE, sae):
        result = model.gradients(ids, part, metric)
        z = result.activations[part]
        direction = torch.randn_like(z) * (z > 0)  # stay on the ReLU's active side
        eps = 1e-6
        plus = model.run_with_interventions(ids, {part: lambda a: a + eps * direction}).logits
        minus = model.run_with_interventions(ids, {part: lambda a: a - eps * direction}).logits
    numeric = (plus[:, -1, 7].sum() - minus[:, -1, 7].sum()) / (2 * eps)
    analytic = (result.grads[part] * direction).sum()
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5)


def test_metric_may_read_sites(model64):
    """d(probe score at layer 1)/d(resid at layer 0) through a metric over the cache."""
    model = model64
    ids = tiny_ids(batch=2, seq=5)
    w = torch.randn(32, dtype=torch.float64)

    def probe_score(logits, cache, batch):
        return (cache["blocks.1.resid_post"][:, -1] @ w).sum()

    result = model.gradients(ids, "blocks.0.resid_post", probe_score, metric_sites="blocks.1.resid_post")
    act = result.activations["blocks.0.resid_post"]
    direction = torch.randn_like(act)
    eps = 1e-6

    def score(delta):
        _, cache = model.run_with_interventions(ids, {"blocks.0.resid_post": lambda a: a + delta},
                                                cache="blocks.1.resid_post")
        return (cache["blocks.1.resid_post"][:, -1] @ w).sum()

    numeric = (score(eps * direction) - score(-eps * direction)) / (2 * eps)
    torch.testing.assert_close((result.grads["blocks.0.resid_post"] * direction).sum(), numeric, rtol=1e-5, atol=1e-7)


def test_narrowed_site_gradients_equal_the_whole_sites_slice(model64):
    ids = tiny_ids(batch=2, seq=5)
    metric = lambda logits, batch: logits[:, -1, 3].sum()  # noqa: E731
    whole = model64.gradients(ids, "blocks.1.attn.z", metric).grads["blocks.1.attn.z"]
    head = model64.gradients(ids, "blocks.1.attn.z.h2", metric).grads["blocks.1.attn.z.h2"]
    assert head.abs().sum() > 0
    torch.testing.assert_close(head, whole[:, :, 2])


def test_fitted_artifacts_plug_in_without_lambdas(model):
    class Eraser:
        def __init__(self, direction):
            self.directions = direction

        def __call__(self, x):
            d = self.directions / self.directions.norm()
            return x - (x @ d)[..., None] * d

    eraser = Eraser(torch.randn(32))
    ids = tiny_ids()
    as_callable = model.run_with_interventions(ids, {SITE: eraser}).logits
    as_project_out = model.run_with_interventions(ids, {SITE: ProjectOut(directions=eraser)}).logits
    with model.splice(SITE, eraser, name="eraser"):
        spliced = model(ids)
    torch.testing.assert_close(as_callable, as_project_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(spliced, as_callable, atol=1e-6, rtol=0)


@pytest.mark.parametrize("description, call, fragment", [
    ("callable returns None", lambda m: m.run_with_interventions(tiny_ids(), {SITE: lambda a: None}),
     "returned NoneType"),
    ("callable wrong shape", lambda m: m.run_with_interventions(tiny_ids(), {SITE: lambda a: a[:, :2]}),
     "returned shape"),
    ("NaN edit", lambda m: m.run_with_interventions(tiny_ids(), {SITE: lambda a: a / 0}), "NaN/inf"),
    ("token id too large", lambda m: m(torch.tensor([[1, 2, 500]])), "outside the vocabulary"),
    ("negative token id", lambda m: m(torch.tensor([[1, -2]])), "outside the vocabulary"),
    ("prompt too long", lambda m: m(torch.ones(1, 65, dtype=torch.long)), "context of 64"),
    ("non-scalar metric", lambda m: m.gradients(tiny_ids(), SITE, lambda lg, b: lg[:, -1, 0]), "return a scalar"),
    ("site as int", lambda m: m.run_with_cache(tiny_ids(), 3), "blocks.3.resid_post"),
    ("site list with int", lambda m: m.run_with_cache(tiny_ids(), [SITE, 3]), "got int"),
])
def test_bad_inputs_get_clear_errors(model, description, call, fragment):
    if description == "prompt too long" and model.info.n_ctx is None:
        pytest.skip("n_ctx is not filled for this model yet")
    with pytest.raises((MechkitError, TypeError)) as info:
        call(model)
    assert fragment in str(info.value)
