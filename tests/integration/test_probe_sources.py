"""Probe sweeps on a real model: features equal prompt by prompt (padding is never data), a store
gives the features the model gives, and a fitted probe plugs into the model as it is."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.interventions import ProjectOut
from mechkit.probing import LinearProbe, LogisticProbe, probe_sweep
from mechkit.probing import features as feats
from mechkit.tasks import TaskSet

pytest.importorskip("sklearn")
SITES = "blocks.*.resid_post"


@pytest.fixture(scope="module")
def model():
    return mechkit.load("zoo:facts-lm")


@pytest.fixture(scope="module")
def polarity():
    items = TaskSet.from_jsonl("probes/polarity_hard.jsonl")
    return TaskSet("polarity_hard", items.items[:120], items.params)


@pytest.mark.parametrize("position", ["last", "mean", 1, -2])
def test_features_of_a_padded_batch_equal_prompt_by_prompt(model, polarity, position):
    prompts = polarity.prompts[:40]
    lengths = {len(model.tokenize(p).input_ids[0]) for p in prompts}
    assert len(lengths) > 1, "the check needs prompts of different lengths"
    _, batched = feats.from_model(model, prompts, SITES, position, batch_size=16, progress=False)
    _, single = feats.from_model(model, prompts, SITES, position, batch_size=1, progress=False)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_sweep_from_a_store_equals_the_sweep_from_the_model(model, polarity, tmp_path):
    store = mechkit.collect(model, polarity.prompts, SITES, tmp_path / "store", positions="all", batch_size=16,
                            progress=False)
    for position in ("last", "mean", 2):
        from_model = probe_sweep(model, polarity, position=position, progress=False, n_boot=50)
        from_store = probe_sweep(store, polarity, position=position, progress=False, n_boot=50)
        torch.testing.assert_close(from_store.accuracy, from_model.accuracy, atol=1e-6, rtol=0)
    assert from_model.sites == [f"blocks.{i}.resid_post" for i in range(4)]
    with pytest.raises(mechkit.errors.MechkitError, match="prompts"):
        probe_sweep(store, TaskSet("short", polarity.items[:50]), progress=False)


def test_a_fitted_probe_plugs_into_the_model(model, polarity, tmp_path):
    site = "blocks.2.resid_post"
    before = model.parameters_fingerprint()
    _, x = feats.from_model(model, polarity.prompts, site, "last", progress=False)
    probe = LogisticProbe().fit(x[0], polarity.labels, site=site).probe_
    batch = polarity.prompts[:8]
    with model.splice(site, probe):  # its score is a site; the forward pass is unchanged
        logits, cache = model.run_with_cache(batch, [site, f"{site}.probe.logit"])
        last = cache.attention_mask.sum(-1) - 1
        rows = torch.arange(len(batch))
        torch.testing.assert_close(cache[f"{site}.probe.logit"][rows, last], probe(cache[site][rows, last]))

        def probe_score(_logits, cache, _batch):
            return cache[f"{site}.probe.logit"][rows, last].sum()

        grads = model.gradients(batch, site, probe_score, metric_sites=f"{site}.probe.logit")
    torch.testing.assert_close(logits, model(batch))
    g = grads.grads[site][rows, last]  # d score / d activation is the probe's weight at the read token
    torch.testing.assert_close(g, probe.weight[:, 0].expand_as(g), atol=1e-5, rtol=1e-4)
    _, erased = model.run_with_interventions(batch, {site: ProjectOut(directions=probe)}, cache=site)
    along = erased[site][rows, last] @ probe.direction
    assert along.abs().max() < 1e-4
    assert model.parameters_fingerprint() == before  # splicing, gradients and edits leave the weights alone
    probe.save(tmp_path / "probe")
    assert torch.equal(LinearProbe.load(tmp_path / "probe")(x[0]), probe(x[0]))


def test_probe_command_writes_result_table_and_plot(tmp_path):
    from typer.testing import CliRunner

    from mechkit.cli import app
    from mechkit.results import Result

    out = tmp_path / "sweep"
    run = CliRunner().invoke(app, ["probe", "zoo:facts-lm", "--dataset", "probes/category_hard.jsonl",
                                   "--out", str(out), "--groups", "group", "--split", "5", "--n-boot", "50",
                                   "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "concept depth" in run.output
    assert {"sweep.png", "sweep.csv", "result.json"} <= {p.name for p in out.iterdir()}
    result = Result.load(out)
    assert result.config["groups"] == "group" and len(result.sites) == 4
    bad = CliRunner().invoke(app, ["probe", "zoo:facts-lm", "--dataset", "probes/category_hard.jsonl", "--out",
                                   str(tmp_path / "x"), "--position", "middle"])
    assert bad.exit_code == 2 and "position" in bad.output


def test_unknown_sites_and_unlabelled_data_are_explained(model, polarity):
    with pytest.raises(mechkit.errors.UnknownSiteError, match="resid_post"):
        probe_sweep(model, polarity, sites="blocks.1.resid_pots", progress=False)
    unlabelled = TaskSet("x", tuple(type(it)(it.prompt, it.answer) for it in polarity.items[:10]))
    with pytest.raises(mechkit.errors.MechkitError, match="no label"):
        probe_sweep(model, unlabelled, progress=False)
    with pytest.raises(mechkit.errors.MechkitError, match="one site"):
        feats.sequences(model, polarity.prompts[:4], "blocks.*.resid_post")
