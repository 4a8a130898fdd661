"""The pathway monitor on a slice of moe-grok's checkpoints: its per-sample losses, groups and distances
equal the definitions computed independently (plain HF forward, routing capture, the pure functions);
results round-trip; routing traces round-trip through an ActivationStore; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechkit
from mechkit.config import ConfigError
from mechkit.errors import MechkitError
from mechkit.moe import (
    PathwayConfig,
    PathwayMonitorResult,
    RoutingTrace,
    capture_routing,
    checkpoint_folders,
    mean_pathway_distance,
    memorized_since,
    pathway_monitor,
    pathway_strings,
    routing_sites,
    split_samples,
    store_sample_routing,
)
from mechkit.zoo.registry import resolve

PICK = (5, 9, 14, 19)  # steps 75, 450, 1250, 3000


@pytest.fixture(scope="module")
def series():
    root = resolve("moe-grok")
    folders, steps = checkpoint_folders(root)
    train, test = split_samples(root)
    g = torch.Generator().manual_seed(0)
    train = [train[i] for i in torch.randperm(len(train), generator=g)[:120].tolist()]
    test = [test[i] for i in torch.randperm(len(test), generator=g)[:120].tolist()]
    config = PathwayConfig(min_group=5, max_samples=1000, progress=False, batch_size=50)
    result = pathway_monitor([folders[i] for i in PICK], train, test, config)
    return [folders[i] for i in PICK], [steps[i] for i in PICK], train, test, result


def test_losses_and_accuracy_are_the_plain_forwards(series):
    folders, steps, train, test, result = series
    assert result.steps == steps
    for c in (0, len(folders) - 1):
        hf = AutoModelForCausalLM.from_pretrained(folders[c], dtype=torch.float32).eval()
        model = mechkit.load(folders[c])
        for samples, loss, acc in ((train, result.train_loss, result.train_accuracy),
                                   (test, result.test_loss, result.test_accuracy)):
            ids = model.tokenize([p for p, _ in samples]).input_ids  # all prompts have 4 tokens
            answers = torch.tensor([model.tokenize([a]).input_ids[0, 0] for _, a in samples])
            with torch.no_grad():
                logits = hf(ids).logits[:, -1]
            nll = torch.nn.functional.cross_entropy(logits, answers)
            assert float(loss[c]) == pytest.approx(float(nll), abs=1e-4)
            assert float(acc[c]) == pytest.approx(float((logits.argmax(-1) == answers).double().mean()))


def test_groups_and_distances_follow_the_definitions(series):
    folders, _, train, _, result = series
    losses = []
    for folder in folders:
        model = mechkit.load(folder)
        ids = model.tokenize([p + a for p, a in train]).input_ids
        with torch.no_grad():
            logits = model(ids)[:, -2]
        losses.append(torch.nn.functional.cross_entropy(logits, ids[:, -1], reduction="none"))
    since = memorized_since(torch.stack(losses), 0.1, 0.05)
    assert (result.group_size == torch.tensor([int(((since >= 0) & (since <= c)).sum()) for c in range(4)])).all()
    c = len(folders) - 1
    members = ((since >= 0) & (since <= c)).nonzero().squeeze(1).tolist()
    trace = capture_routing(mechkit.load(folders[c]), [train[i][0] for i in members])
    for t, tau in enumerate(result.taus):
        expected = mean_pathway_distance(pathway_strings(trace.sample_routing(), tau))
        assert float(result.distance[t, c]) == pytest.approx(expected, abs=1e-9)
    assert result.smoothness.isnan().all()  # two MoE layers: smoothness is undefined (S ≡ 1)
    assert result.layer_distance.shape == (3, 4, 2)


def test_result_round_trips_and_presents(series, tmp_path):
    *_, result = series
    back = PathwayMonitorResult.load(result.save(tmp_path / "r"))
    assert back.equals(result)
    frame = result.to_frame()
    assert len(frame) == 3 * 4 and set(frame.tau) == {0.5, 0.7, 0.8}
    table = result.correlations()
    assert list(table.metric[:3]) == ["distance (tau 0.5)", "distance (tau 0.7)", "distance (tau 0.8)"]
    assert result.plot() is not None


def test_routing_trace_round_trips_through_a_store_and_a_folder(tmp_path):
    model = mechkit.load("zoo:moe-grok")
    prompts = ["3 + 5 =", "1 - 2", "7 + 7 = 14"]
    trace = capture_routing(model, prompts)
    store = mechkit.collect(model, prompts, routing_sites(model), tmp_path / "store", progress=False)
    back = RoutingTrace.from_store(store)
    assert back.layers == trace.layers and torch.equal(back.mask, trace.mask)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(back.probs, trace.probs))
    assert all(torch.equal(a, b) for a, b in zip(back.chosen, trace.chosen))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(store_sample_routing(store), trace.sample_routing()))
    assert RoutingTrace.load(trace.save(tmp_path / "trace")).equals(trace)


def test_bad_input_is_refused(tmp_path):
    grok, _ = checkpoint_folders(resolve("moe-grok"))
    deep, _ = checkpoint_folders(resolve("moe-grok-deep"))
    samples = [("3 + 5 =", " 8"), ("1 - 2 =", " 58")]
    with pytest.raises(MechkitError, match="different architecture"):
        pathway_monitor([grok[0], deep[1]], samples, samples, progress=False)
    with pytest.raises(MechkitError, match="empty answer"):
        pathway_monitor(grok[:2], [("3 + 5 =", "")], samples, progress=False)
    with pytest.raises(MechkitError, match="empty prompt"):
        pathway_monitor(grok[:2], samples, [(" ", " 8")], progress=False)
    for tau in (0.0, 1.2):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            PathwayConfig(taus=(0.7, tau))
    with pytest.raises(MechkitError, match="no MoE layers"):
        pathway_monitor([resolve("facts-lm"), resolve("facts-lm")], samples, samples, progress=False)
    with pytest.raises(MechkitError, match="at least two checkpoints"):
        pathway_monitor(grok[:1], samples, samples)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "3 + 5 ="}) + "\n")
    with pytest.raises(MechkitError, match="prompt"):
        pathway_monitor(grok[:2], bad, samples)
