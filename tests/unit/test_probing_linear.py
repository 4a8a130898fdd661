"""Linear probes against scikit-learn, the batched sweep against a loop of sklearn fits, metrics,
concept depth, splits and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.probing import (
    LinearProbe,
    LogisticProbe,
    MeanDiffProbe,
    RidgeProbe,
    concept_depth,
    functional,
    metrics,
    probe_sweep,
)
from mechkit.probing.splits import split_masks

sk = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression, RidgeClassifier  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def problem(n=600, d=24, classes=2, signal=0.6, seed=0):
    """Correlated, badly scaled features whose class signal sits on one direction per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -1.5, d)[:, None]
    x = torch.randn(n, d, generator=g) @ mix
    means = torch.randn(classes, d, generator=g)
    x = x + signal * means[y] * x.std(0)
    x[:, :2] = x[:, :2] * 30 + 5  # rogue, shifted dimensions
    return x, y


def raw_coef(pipe):
    scaler, model = pipe[0], pipe[-1]
    return model.coef_.reshape(-1, scaler.scale_.shape[0]) / scaler.scale_


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_matches_sklearn(classes):
    x, y = problem(classes=classes)
    x_tr, y_tr, x_te, y_te = x[:400], y[:400], x[400:], y[400:]
    mine = LogisticProbe(C=1.0, tol=1e-7, max_iter=5000).fit(x_tr, y_tr)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-10, max_iter=20000))
    ref.fit(x_tr.double().numpy(), y_tr.numpy())
    assert abs(mine.score(x_te, y_te) - ref.score(x_te.double().numpy(), y_te.numpy())) <= 0.01
    ours, theirs = mine.coef_.double().numpy(), raw_coef(ref)
    assert ours.shape == theirs.shape
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a, b)[0, 1] > 0.999
    np.testing.assert_allclose(ours, theirs, rtol=0.02, atol=0.02 * np.abs(theirs).max())
    proba = mine.predict_proba(x_te).double().numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(x_te.double().numpy()), atol=5e-3)


def test_logistic_without_standardisation_matches_sklearn():
    x, y = problem(d=10)
    mine = LogisticProbe(C=0.3, standardize=False, tol=1e-8, max_iter=20000).fit(x, y)
    ref = LogisticRegression(C=0.3, tol=1e-10, max_iter=50000).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(mine.coef_.double().numpy(), ref.coef_, rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(mine.intercept_.double().numpy(), ref.intercept_, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("classes", [2, 4])
def test_ridge_matches_sklearn_ridge_classifier(classes):
    x, y = problem(classes=classes, seed=3)
    mine = RidgeProbe(alpha=2.0).fit(x[:400], y[:400])
    ref = make_pipeline(StandardScaler(), RidgeClassifier(alpha=2.0)).fit(x[:400].double().numpy(), y[:400].numpy())
    np.testing.assert_allclose(mine.coef_.double().numpy(), raw_coef(ref), rtol=1e-3, atol=1e-5)
    assert abs(mine.score(x[400:], y[400:]) - ref.score(x[400:].double().numpy(), y[400:].numpy())) <= 0.01


def test_mean_diff_is_the_difference_of_class_means():
    x, y = problem(seed=5)
    probe = MeanDiffProbe().fit(x, y)
    mu0, mu1 = x[y == 0].mean(0), x[y == 1].mean(0)
    torch.testing.assert_close(probe.coef_[0], mu1 - mu0, rtol=1e-4, atol=1e-4)
    midpoint = (mu0 + mu1) / 2
    assert abs(float(probe(midpoint[None])[0, 0])) < 1e-2 * float((mu1 - mu0).norm() * midpoint.norm())
    centroid = MeanDiffProbe().fit(*problem(classes=3, seed=6))
    x3, y3 = problem(classes=3, seed=6)
    nearest = torch.cdist(x3, torch.stack([x3[y3 == c].mean(0) for c in range(3)])).argmin(1)
    assert (centroid.predict(x3) == nearest).float().mean() > 0.99


def test_batched_sweep_equals_a_loop_of_sklearn_fits():
    g = torch.Generator().manual_seed(1)
    layers = [problem(n=500, d=16, signal=s, seed=7)[0] for s in (0.05, 0.2, 0.5)]
    y = problem(n=500, d=16, seed=7)[1]
    x = torch.stack([layer + 0.1 * torch.randn(layer.shape, generator=g) for layer in layers])
    result = probe_sweep(x, y, split=5, control=False, n_boot=50)
    masks = split_masks(y, 5)
    for layer in range(3):
        accs, f1s, aucs = [], [], []
        for train in masks:
            ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            ref.fit(x[layer][train].numpy(), y[train].numpy())
            xt, yt = x[layer][~train].numpy(), y[~train].numpy()
            accs.append(ref.score(xt, yt))
            f1s.append(f1_score(yt, ref.predict(xt)))
            aucs.append(roc_auc_score(yt, ref.decision_function(xt)))
        assert abs(result.accuracy[layer].item() - np.mean(accs)) <= 0.01
        assert abs(result.f1[layer].item() - np.mean(f1s)) <= 0.015
        assert abs(result.auroc[layer].item() - np.mean(aucs)) <= 0.005
    assert result.ci_low.le(result.accuracy).all() and result.ci_high.ge(result.accuracy).all()


def test_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g)
    scores = torch.randn(200, 3, generator=g) + torch.nn.functional.one_hot(y, 3)
    scores[:20, 0] = scores[20:40, 0]  # ties
    pred = scores.argmax(1)
    assert metrics.f1(pred, y, 3).item() == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    binary = (y == 1).long()
    assert metrics.auroc(scores[:, 1], binary, 2).item() == pytest.approx(roc_auc_score(binary, scores[:, 1]), abs=1e-6)
    assert metrics.auroc(scores[:, 0].round(decimals=1), binary, 2).item() == pytest.approx(
        roc_auc_score(binary, scores[:, 0].round(decimals=1)), abs=1e-6)


def test_concept_depth_definitions():
    lower = lambda acc: torch.tensor(acc) - 0.02  # noqa: E731
    acc = [0.50, 0.52, 0.60, 0.80, 0.90, 0.91, 0.90, 0.85]
    depth = concept_depth(torch.tensor(acc), lower(acc), 0.5)
    assert depth.jump == 3 / 8  # 0.52 → 0.60 is a 15% rise and 0.58 clears 0.55, held at layer 4
    assert depth.converging == 5 / 8 and depth.peak == 6 / 8
    noisy = [0.50, 0.56, 0.50, 0.51, 0.50]  # a rise on noise that does not hold
    assert concept_depth(torch.tensor(noisy), lower(noisy), 0.5).jump is None


def test_group_splits_keep_groups_apart_and_leak_free_scores():
    y = torch.tensor([0, 1] * 50)
    groups = [i // 2 for i in range(100)]  # a true and a false twin share a group
    for split in (0.6, 5):
        for train in split_masks(y, split, groups=groups):
            assert not set(np.array(groups)[train.numpy()]) & set(np.array(groups)[(~train).numpy()])


def test_artifact_directions_logit_and_save_load(tmp_path):
    x, y = problem()
    probe = LogisticProbe().fit(x, y).probe_
    assert isinstance(probe, LinearProbe)
    assert torch.allclose(probe.direction.norm(), torch.tensor(1.0))
    torch.testing.assert_close(probe(x)[:, 0], x @ probe.weight[:, 0] + probe.bias[0])
    probe.save(tmp_path / "p")
    again = LinearProbe.load(tmp_path / "p")
    assert torch.equal(again(x), probe(x)) and torch.equal(again.classes, probe.classes)
    (tmp_path / "p" / "probe.safetensors").write_bytes(b"broken")
    with pytest.raises(MechkitError, match="checksum"):
        LinearProbe.load(tmp_path / "p")


def test_solver_converges_on_separable_data():
    x = torch.cat([torch.randn(50, 3) + 4, torch.randn(50, 3) - 4])
    y = torch.tensor([1] * 50 + [0] * 50)
    fit = functional.fit_logistic(x[None], y, torch.ones(1, 100, dtype=torch.bool), n_classes=2)
    assert int(fit.n_iter) < 500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=10000)).fit(x.numpy(), y.numpy())
    assert np.corrcoef(fit.weight[0, 0, :, 0].numpy(), raw_coef(ref)[0])[0, 1] > 0.999


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x, torch.zeros_like(y)), "single class"),
    (lambda x, y: (x, y[:-1]), "labels"),
    (lambda x, y: (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y), "NaN"),
    (lambda x, y: (x[:, None], y), "shape"),
    (lambda x, y: (x[:0], y[:0]), "empty"),
])
def test_bad_input_is_explained(bad, message):
    x, y = problem()
    with pytest.raises(MechkitError, match=message):
        LogisticProbe().fit(*bad(x, y))


def test_bad_sweep_input_is_explained():
    x, y = problem(n=40)
    with pytest.raises(MechkitError, match="folds need at least"):
        probe_sweep(x, torch.tensor([0] * 37 + [1] * 3), split=5)
    with pytest.raises(MechkitError, match="labels"):
        probe_sweep(x, y[:-3])
    with pytest.raises(MechkitError, match="not fitted"):
        LogisticProbe().predict(x)


def test_fewer_rows_than_features_uses_the_dual_and_matches_sklearn():
    x, y = problem(n=120, d=200, signal=0.3, seed=9)  # separable: Newton in the dual
    mine = LogisticProbe(tol=1e-7).fit(x, y)
    assert mine.n_iter_ < 50
    ref = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=100000)).fit(x.double().numpy(),
                                                                                              y.numpy())
    ours, theirs = mine.coef_[0].double().numpy(), raw_coef(ref)[0]
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9999
    np.testing.assert_allclose(mine.decision_function(x).double().numpy(), ref.decision_function(x.double().numpy()),
                               atol=1e-3 * np.abs(ref.decision_function(x.double().numpy())).max())
