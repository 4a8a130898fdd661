"""Properties every intervention and every backend run must have (reference backend)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechkit
from mechkit.interventions import (
    Add,
    Apply,
    Mean,
    ProjectOut,
    Replace,
    Resample,
    Scale,
    Zero,
    selection_mask,
)
from mechkit.selection import RunContext
from mechkit.sites import Site
from tests.conftest import ARCHS, tiny_hf_model, tiny_ids


def hook_count(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return mechkit.load(tiny_hf_model(request.param))


def test_patching_every_site_with_itself_changes_nothing(model):
    ids = tiny_ids()
    logits, cache = model.run_with_cache(ids, "*")
    writable = [s for s in cache if model._writable(s) is None]
    patched = model.run_with_interventions(ids, {s: Replace(source=cache) for s in writable}).logits
    assert torch.equal(patched, logits)
    for site in writable:  # one at a time too: no site's write path perturbs the forward
        assert torch.equal(model.run_with_interventions(ids, {site: Replace(source=cache)}).logits, logits), site


def test_no_analysis_changes_the_weights(model):
    before = model.parameters_fingerprint()
    ids = tiny_ids()
    _, cache = model.run_with_cache(ids, "*")
    sites = [s for s in model.resolve("blocks.0.*") if model._writable(s) is None]
    for iv in (Zero(), Scale(factor=3.0), Mean(), Resample(seed=1), Replace(source=cache)):
        model.run_with_interventions(ids, {s: iv for s in sites})
    model.gradients(ids, "blocks.*.resid_post", lambda logits, batch: logits[:, -1].logsumexp(-1).sum())
    with model.intervene({"blocks.0.resid_post": Zero()}):
        model(ids)
    assert model.parameters_fingerprint() == before
    assert all(p.grad is None for p in model.module.parameters())


def test_no_hooks_remain_after_runs_and_errors():
    model = mechkit.load(tiny_hf_model("gpt2"))
    ids = tiny_ids()
    model.run_with_cache(ids, "*")
    assert hook_count(model.module) == 0

    def explode(act, site):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_interventions(ids, {"blocks.1.mlp.out": Apply(fn=explode)})
    assert hook_count(model.module) == 0
    with pytest.raises(ValueError, match="inside"), model.intervene({"blocks.0.resid_post": Zero()}):
        model(ids)
        raise ValueError("raised inside the block")
    assert hook_count(model.module) == 0 and not model._context_writes
    # and the context really was active inside, and is gone after
    plain = model(ids)
    with model.intervene({"blocks.0.resid_post": Zero()}):
        inside = model(ids)
    assert not torch.equal(inside, plain) and torch.equal(model(ids), plain)


def test_position_selection_respects_causality():
    model = mechkit.load(tiny_hf_model("llama"))
    ids = tiny_ids(seq=8)
    _, clean = model.run_with_cache(ids, "blocks.1.resid_post")
    _, hit = model.run_with_interventions(ids, {"blocks.0.resid_post": Zero(positions=5)}, cache="blocks.1.resid_post")
    diff = (hit["blocks.1.resid_post"] - clean["blocks.1.resid_post"]).abs().amax(dim=(0, 2))
    assert diff[:5].max() == 0 and diff[5:].min() > 0


def test_head_selection_equals_head_site():
    model = mechkit.load(tiny_hf_model("gpt2"))
    ids = tiny_ids()
    a = model.run_with_interventions(ids, {"blocks.0.attn.z": Zero(heads=[2])}).logits
    b = model.run_with_interventions(ids, {"blocks.0.attn.z.h2": Zero()}).logits
    c = model.run_with_interventions(ids, {"blocks.0.attn.z": Zero(heads=[1])}).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_add_project_out_mean_resample_semantics():
    model = mechkit.load(tiny_hf_model("gpt2"))
    ids = tiny_ids(batch=4)
    site = "blocks.0.resid_post"
    _, clean = model.run_with_cache(ids, site)
    x = clean[site]
    v = torch.randn(x.shape[-1])

    def after(iv):
        _, cache = model.run_with_interventions(ids, {site: iv}, cache=site)
        return cache[site]

    torch.testing.assert_close(after(Add(vector=v, coeff=0.5)), x + 0.5 * v)
    projected = after(ProjectOut(directions=v))
    assert (projected @ v).abs().max() < 1e-4
    torch.testing.assert_close(projected + ((x @ v) / (v @ v))[..., None] * v, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(after(Mean()), x.mean(0, keepdim=True).expand_as(x))
    resampled = after(Resample(seed=3))
    assert torch.equal(resampled, after(Resample(seed=3)))
    rows = [next(j for j in range(4) if torch.equal(resampled[i], x[j])) for i in range(4)]
    assert sorted(rows) == [0, 1, 2, 3] and all(r != i for i, r in enumerate(rows))
    neurons = after(Zero(positions=[0, -1]))
    assert neurons[:, [0, -1]].abs().max() == 0 and torch.equal(neurons[:, 1:-1], x[:, 1:-1])


@settings(max_examples=60, deadline=None)
@given(
    pos=st.one_of(st.none(), st.lists(st.integers(-6, 5), min_size=1, max_size=3), st.integers(-6, 5)),
    heads=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=3)),
)
def test_selection_mask_equals_manual_indexing(pos, heads):
    act = torch.randn(2, 6, 4, 3)
    site = Site("attn.z", 0)
    selectors = {k: v for k, v in {"pos": pos, "head": heads}.items() if v is not None}
    mask = selection_mask(act, site.axes, selectors, RunContext.dense(2, 6), site)
    expected = torch.zeros_like(act, dtype=torch.bool)
    p = slice(None) if pos is None else ([pos] if isinstance(pos, int) else pos)
    h = slice(None) if heads is None else heads
    view = expected[:, p]
    view[:, :, h] = True
    expected[:, p] = view
    if mask is None:
        assert not selectors
    else:
        assert torch.equal(mask.expand_as(act), expected)


def test_per_example_positions_mask():
    model = mechkit.load(tiny_hf_model("gpt2"))
    ids = tiny_ids(batch=2, seq=5)
    site = "blocks.0.resid_post"
    _, clean = model.run_with_cache(ids, site)
    where = torch.zeros(2, 5, dtype=torch.bool)
    where[0, 1] = where[1, 3] = True
    _, hit = model.run_with_interventions(ids, {site: Zero(positions=where)}, cache=site)
    changed = hit[site].ne(clean[site]).any(-1)
    assert torch.equal(changed, where)


def test_any_module_by_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = mechkit.load(net)
    x = torch.randn(4, 5, 6)
    out, cache = model.run_with_cache(x, ["module:0", "module:1"])
    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(cache["module:1"], torch.relu(net[0](x)))
    ablated = model.run_with_interventions(x, {"module:1": Zero()}).logits
    torch.testing.assert_close(ablated, net[2].bias.expand(4, 5, 3))
    assert hook_count(net) == 0
    with pytest.raises(mechkit.errors.UnknownSiteError, match="nearest"):
        model.run_with_cache(x, "module:3")
