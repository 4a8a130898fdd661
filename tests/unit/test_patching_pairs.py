"""Patching inputs and metrics: pairs line up among real tokens, answers are single tokens, metrics
read each row's last real token, and recovery refuses a corruption with no effect."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit import tasks
from mechkit.errors import MechkitError
from mechkit.patching import accuracy, answer_logprob, kl_to, last_logits, logit_diff, make_pairs, recovery


@pytest.fixture(scope="module")
def model():
    return mechkit.load("zoo:facts-lm")


def test_pairs_from_a_task_set_and_metrics_per_row(model):
    ioi = tasks.generate("ioi", 6, 0, corrupt="abc")
    pairs = make_pairs(model, ioi)
    assert len(pairs) == 6 and pairs.wrong is not None
    assert torch.equal(pairs.lengths, pairs.corrupt.attention_mask.sum(-1))
    logits = model(pairs.clean)
    # each row's metric equals the same prompt run alone
    for i in range(len(pairs)):
        alone = model(model.tokenize(ioi[i].prompt))[0, -1]
        assert torch.allclose(last_logits(logits, pairs)[i], alone, atol=1e-5)
        ld = alone[pairs.answers[i]] - alone[pairs.wrong[i]]
        assert logit_diff(logits, pairs)[i] == pytest.approx(float(ld), abs=1e-4)
    assert accuracy(logits, pairs).mean() > 0.9  # facts-lm solves IOI
    assert (answer_logprob(logits, pairs) <= 0).all()
    repeated = pairs.select([0, 0, 3])
    assert torch.equal(repeated.rows, torch.tensor([0, 0, 3]))
    kl = kl_to(last_logits(logits, pairs))(model(repeated.clean), repeated)
    assert torch.allclose(kl, torch.zeros(3), atol=1e-5)


def test_recovery_is_normalised_both_ways():
    assert float(recovery(2.0, clean=2.0, corrupt=-1.0)) == pytest.approx(1.0)
    assert float(recovery(-1.0, clean=2.0, corrupt=-1.0)) == pytest.approx(0.0)
    assert float(recovery(-1.0, clean=2.0, corrupt=-1.0, direction="noise")) == pytest.approx(1.0)
    assert float(recovery(0.5, clean=2.0, corrupt=-1.0, direction="noise")) == pytest.approx(0.5)
    with pytest.raises(MechkitError, match="no effect to explain"):
        recovery(1.0, clean=1.0, corrupt=1.0)
    with pytest.raises(MechkitError, match="NaN"):
        recovery(float("nan"), clean=1.0, corrupt=0.0)


def test_bad_pairs(model):
    with pytest.raises(MechkitError, match="different lengths"):
        make_pairs(model, ["Alice and Bob went to the"], ["Alice went to the"], [" Bob"])
    with pytest.raises(MechkitError, match="not one"):
        make_pairs(model, ["The box is"], ["The pen is"], [" red box"])
    with pytest.raises(MechkitError, match="give one of each"):
        make_pairs(model, ["The box is", "The pen is"], ["The pen is"], [" red"])
    with pytest.raises(MechkitError, match="no prompts"):
        make_pairs(model, [], [], [])
    pairs = make_pairs(model, ["The box is"], ["The pen is"], [" red"])
    with pytest.raises(MechkitError, match="counterfactual"):
        logit_diff(model(pairs.clean), pairs)


def test_patching_result_frame_top_plot_and_round_trip(tmp_path):
    from mechkit.patching.result import PatchingResult

    scores = torch.tensor([[[0.1, 0.9], [0.0, -0.5]], [[0.2, float("nan")], [0.3, 0.4]]])
    result = PatchingResult(scores=scores, axes=("site", "head", "position"),
                            labels={"site": ["a", "b"], "position": ["0: x", "1: y"]}, method="activation",
                            metric="logit_diff", clean=2.0, corrupt=-1.0, n_prompts=3)
    frame = result.to_frame()
    assert len(frame) == 8 and set(frame.columns) >= {"site", "head", "position", "score"}
    top = result.top(2)
    assert list(top["score"]) == pytest.approx([0.9, -0.5])
    assert result.plot() is not None and result.plot(select={"position": 0}) is not None
    result.save(tmp_path / "r")
    assert PatchingResult.load(tmp_path / "r").equals(result)
    with pytest.raises(MechkitError, match="labels"):
        PatchingResult(scores=scores, axes=("site", "head", "position"), labels={"site": ["a"]},
                       method="activation", metric="m")
