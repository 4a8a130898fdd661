"""Activation patching on facts-lm: batched sweeps equal one-variant-per-forward sweeps and direct
interventions, prompts of different lengths equal patching each prompt alone, clean-into-clean
recovers everything, and bad input is a clear error."""

from __future__ import annotations

import math

import pytest
import torch

import mechkit
from mechkit import tasks
from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.models.inputs import Batch
from mechkit.patching import PatchingPairs, logit_diff, make_pairs, recovery
from mechkit.patching.activation import activation_patching
from mechkit.patching.config import PatchConfig

FAST = {"progress": False}


@pytest.fixture(scope="module")
def model():
    return mechkit.load("zoo:facts-lm")


@pytest.fixture(scope="module")
def mixed(model):
    """IOI pairs of several lengths (clean and corrupt equal within each pair)."""
    pairs = make_pairs(model, tasks.generate("ioi", 12, 3, corrupt="abc"))
    lengths = pairs.lengths.tolist()
    chosen = [lengths.index(n) for n in sorted(set(lengths))][:3]
    chosen += [i for i in range(len(lengths)) if i not in chosen][: 5 - len(chosen)]
    out = pairs.select(chosen)
    assert len(set(out.lengths.tolist())) >= 2
    return PatchingPairs(out.clean, out.corrupt, out.answers, out.wrong, out.clean_prompts, out.corrupt_prompts)


def _metric_means(model, pairs):
    return logit_diff(model(pairs.clean), pairs).mean(), logit_diff(model(pairs.corrupt), pairs).mean()


def test_batched_sweeps_equal_one_variant_per_forward(model, mixed):
    for options in ({"sites": "blocks.*.resid_pre"}, {"sites": "blocks.1.attn.z,blocks.3.attn.z"},
                    {"sites": "blocks.*.attn.z", "positions": "all"},
                    {"sites": "blocks.2.mlp.post", "neurons": [0, 7, 300], "positions": [-1, 2]}):
        reference = activation_patching(model, mixed, variants_per_forward=1, skip_unchanged=False, **options, **FAST)
        for chunk, skip in ((3, False), (7, True), (None, False), (None, True)):
            batched = activation_patching(model, mixed, variants_per_forward=chunk, skip_unchanged=skip,
                                          **options, **FAST)
            assert batched.axes == reference.axes and batched.labels == reference.labels
            assert torch.allclose(batched.scores, reference.scores, atol=1e-5, equal_nan=True), (options, chunk)


def test_a_cell_equals_a_direct_intervention(model, mixed):
    """Independent path: Replace from the clean cache, one cell at a time over the whole batch."""
    clean, corrupt = _metric_means(model, mixed)
    cache = model.run_with_cache(mixed.clean, ["blocks.2.attn.z", "blocks.1.mlp.post"]).cache
    heads = activation_patching(model, mixed, sites="blocks.*.attn.z", positions="all", **FAST)
    run = model.run_with_interventions(mixed.corrupt, {"blocks.2.attn.z": Replace(source=cache, heads=[3])})
    expected = recovery(logit_diff(run.logits, mixed).mean(), clean, corrupt)
    assert heads.labels["head"][2 * 4 + 3] == "L2.H3"
    assert float(heads.scores[2 * 4 + 3]) == pytest.approx(float(expected), abs=1e-5)
    neurons = activation_patching(model, mixed, sites="blocks.1.mlp.post", neurons=[5, 9], positions="last",
                                  normalized=False, **FAST)
    assert neurons.axes == ("site", "neuron") and neurons.labels["neuron"] == ["N5", "N9"]
    run = model.run_with_interventions(mixed.corrupt, {"blocks.1.mlp.post": Replace(source=cache, positions="last",
                                                                                    neurons=[9])})
    assert float(neurons.scores[0, 1]) == pytest.approx(float(logit_diff(run.logits, mixed).mean()), abs=1e-5)


@pytest.mark.parametrize("align", ["start", "end"])
def test_mixed_lengths_equal_patching_each_prompt_alone(model, mixed, align):
    sweep = dict(sites="blocks.*.resid_pre,blocks.1.attn.out", align=align, **FAST)
    batched_raw = activation_patching(model, mixed, normalized=False, **sweep)
    batched = activation_patching(model, mixed, **sweep)
    longest = int(mixed.lengths.max())
    assert batched.scores.shape == (5, longest)
    patched = torch.zeros(5, longest, dtype=torch.float64)
    clean, corrupt, count = (torch.zeros(longest, dtype=torch.float64) for _ in range(3))
    for i in range(len(mixed)):
        one = mixed.select([i])
        n = int(one.lengths[0])
        alone = activation_patching(model, one, normalized=False, **sweep).scores.double()
        slots = slice(0, n) if align == "start" else slice(longest - n, longest)
        assert not torch.isnan(alone).any()
        patched[:, slots] += alone
        c, k = _metric_means(model, one)
        clean[slots] += c
        corrupt[slots] += k
        count[slots] += 1
    assert torch.allclose(batched_raw.scores.double(), patched / count, atol=1e-4)
    expected = recovery(patched / count, clean / count, corrupt / count)
    assert torch.allclose(batched.scores.double(), expected, atol=1e-4)
    labels = batched.labels["position"]
    assert labels[0 if align == "start" else -1].split(": ")[0] == ("0" if align == "start" else "-1")


def test_positions_no_prompt_has_are_nan(model, mixed):
    result = activation_patching(model, mixed, sites="blocks.0.resid_pre", positions=[0, 40], **FAST)
    assert not math.isnan(float(result.scores[0, 0])) and math.isnan(float(result.scores[0, 1]))
    assert result.top(3)["position"].tolist() == [result.labels["position"][0]]


def test_clean_into_clean_recovers_everything(model, mixed):
    clean, corrupt = _metric_means(model, mixed)
    per_prompt = logit_diff(model(mixed.clean), mixed).double()
    same = PatchingPairs(mixed.clean, mixed.clean, mixed.answers, mixed.wrong, mixed.clean_prompts,
                         mixed.clean_prompts)
    each = torch.stack([per_prompt[mixed.lengths > p].mean() for p in range(int(mixed.lengths.max()))])
    for options, expected in (({"sites": "blocks.*.resid_pre"}, each.expand(4, -1)),
                              ({"sites": "blocks.*.attn.z", "positions": "all"}, per_prompt.mean().expand(16)),
                              ({"sites": "blocks.0.mlp.post", "neurons": [1, 2], "positions": "last"},
                               per_prompt.mean().expand(1, 2))):
        raw = activation_patching(model, same, normalized=False, skip_unchanged=False, **options, **FAST)
        assert torch.allclose(raw.scores.double(), expected, atol=1e-4)  # the clean metric, cell by cell
        full = recovery(raw.scores, clean, corrupt) if options.get("positions") else None
        assert full is None or torch.allclose(full, torch.ones_like(full), atol=1e-4)
    # patching the whole clean residual stream at any layer restores the clean run, in both directions
    for direction in ("denoise", "noise"):
        full = activation_patching(model, mixed, sites="blocks.*.resid_pre,blocks.3.resid_post", positions="all",
                                   direction=direction, **FAST)
        assert full.axes == ("site",)
        assert torch.allclose(full.scores, torch.ones(5), atol=1e-4)


def test_noise_direction_scores_against_the_clean_run(model, mixed):
    clean, corrupt = _metric_means(model, mixed)
    result = activation_patching(model, mixed, sites="blocks.1.resid_post", positions="last", direction="noise",
                                 **FAST)
    cache = model.run_with_cache(mixed.corrupt, "blocks.1.resid_post").cache
    run = model.run_with_interventions(mixed.clean, {"blocks.1.resid_post": Replace(source=cache, positions="last")})
    expected = recovery(logit_diff(run.logits, mixed).mean(), clean, corrupt, direction="noise")
    assert float(result.scores[0]) == pytest.approx(float(expected), abs=1e-5)
    assert result.direction == "noise" and result.clean == pytest.approx(float(clean), abs=1e-5)


def test_no_effect_to_explain(model, mixed):
    same = PatchingPairs(mixed.clean, mixed.clean, mixed.answers, mixed.wrong, mixed.clean_prompts,
                         mixed.clean_prompts)
    with pytest.raises(MechkitError, match="no effect to explain"):
        activation_patching(model, same, **FAST)


def test_bad_input(model, mixed):
    with pytest.raises(MechkitError, match="sites is empty"):
        activation_patching(model, mixed, sites="", **FAST)
    with pytest.raises(MechkitError, match="matches no site"):
        activation_patching(model, mixed, sites="blocks.*.resid_nowhere", **FAST)
    with pytest.raises(MechkitError, match="neurons=\\[\\]"):
        activation_patching(model, mixed, sites="blocks.0.mlp.post", neurons=[], **FAST)
    with pytest.raises(MechkitError, match="head-axis sites only"):
        activation_patching(model, mixed, sites="blocks.0.attn.z,blocks.0.resid_pre", **FAST)
    with pytest.raises(MechkitError, match="position axis"):
        activation_patching(model, mixed, sites="blocks.0.attn.pattern", **FAST)
    with pytest.raises(MechkitError, match="out of range"):
        activation_patching(model, mixed, sites="blocks.0.mlp.post", neurons=[10_000], **FAST)

    def nan_metric(logits, targets):
        return torch.full((logits.shape[0],), math.nan)

    with pytest.raises(MechkitError, match="NaN"):
        activation_patching(model, mixed, metric=nan_metric, **FAST)

    def nan_when_patched(logits, targets):  # finite on the plain runs, NaN once rows are stacked
        value = logit_diff(logits, targets)
        return value if logits.shape[0] == len(mixed) else value * math.nan

    with pytest.raises(MechkitError, match="patched run"):
        activation_patching(model, mixed, sites="blocks.3.resid_pre", metric=nan_when_patched, **FAST)
    with pytest.raises(MechkitError, match="one value per row"):
        activation_patching(model, mixed, metric=lambda logits, t: logits.sum(), **FAST)
    with pytest.raises(MechkitError, match="no option"):
        activation_patching(model, mixed, position="last")
    order = torch.argsort(mixed.lengths)  # lengths differ, so re-ordered corrupt rows no longer match their pairs
    shuffled = Batch(mixed.corrupt.input_ids[order], mixed.corrupt.attention_mask[order])
    assert not torch.equal(shuffled.attention_mask, mixed.corrupt.attention_mask)
    with pytest.raises(MechkitError, match="different real lengths"):
        activation_patching(model, PatchingPairs(mixed.clean, shuffled, mixed.answers, mixed.wrong,
                                                 mixed.clean_prompts, mixed.corrupt_prompts), **FAST)


def test_config_round_trip_and_result(model, mixed, tmp_path):
    config = PatchConfig(sites="blocks.*.attn.z", positions="all", variants_per_forward=4, progress=False)
    assert PatchConfig.from_yaml(config.to_yaml()) == config
    result = activation_patching(model, mixed, config, direction="denoise")
    assert result.method == "activation" and result.metric == "logit_diff" and result.n_prompts == 5
    assert result.config["sites"] == "blocks.*.attn.z" and result.labels["head"][:2] == ["L0.H0", "L0.H1"]
    result.save(tmp_path / "r")
    assert type(result).load(tmp_path / "r").equals(result)
    sweep = activation_patching(model, mixed, sites=["blocks.0.resid_pre", "blocks.2.resid_mid"], **FAST)
    assert sweep.labels["site"] == ["blocks.0.resid_pre", "blocks.2.resid_mid"]
    first = mixed.clean.input_ids[0, 0]
    assert sweep.labels["position"][0] == f"0: {model.tokenizer.decode([int(first)])}"
