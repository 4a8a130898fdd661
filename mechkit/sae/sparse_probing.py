"""SAEBench-style k-sparse probing and feature absorption on a labelled binary concept.

k-sparse probing: the latents are ranked by |mean activation on positives − mean on negatives| over
the training split; a logistic regression (scikit-learn, on standardised inputs) on the top k
latents is scored on the held-out split for each k, beside the same regression on the full raw
features (the dense baseline). A concept an SAE isolates is read as well by very few latents.

Feature absorption (after Chanin et al., "A is for Absorption", as SAEBench measures it): the
concept's *main latents* are the top latents by positive mean difference, taken while each one
more raises the training F1 of the k-sparse probe by more than ``f1_gain``. On held-out positive
items where no main latent fires, the concept must come from elsewhere: an item counts as
*absorbed* when latents that fire there and whose decoder direction is aligned with the probe
direction (cosine ≥ ``cos_threshold``) supply at least ``share`` of the positive projection of the
item's firing latents onto the probe direction (``a_j · d_j · p̂``). The absorption rate is absorbed
items over all held-out positives. Unlike SAEBench, items are not first filtered to those the
dense probe classifies correctly (only a direction is given, no probe bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.config import Config, ConfigError, option
from mechkit.errors import MechkitError
from mechkit.provenance import provenance
from mechkit.results import Result
from mechkit.sae.compare import as_direction, concepts, encode_rows
from mechkit.sae.directions import decoder_directions

__all__ = ["AbsorptionConfig", "AbsorptionResult", "SparseProbingResult", "feature_absorption", "k_sparse_probing"]


def _sklearn() -> Any:
    try:
        from sklearn import linear_model, metrics, model_selection, pipeline, preprocessing
    except ImportError as exc:  # an optional dependency (the probes extra)
        raise MechkitError("k-sparse probing needs scikit-learn: pip install 'mechkit[probes]'") from exc
    return linear_model, metrics, model_selection, pipeline, preprocessing


@dataclass(frozen=True)
class _Split:
    train: Tensor  # indices
    test: Tensor


def _split(y: Tensor, test_fraction: float, seed: int) -> _Split:
    if not 0 < test_fraction < 1:
        raise MechkitError(f"test_fraction={test_fraction}: must be in (0, 1)")
    if min(int(y.sum()), int((~y).sum())) < 2:
        raise MechkitError("each class needs at least 2 items to split into train and test")
    _, _, model_selection, _, _ = _sklearn()
    train, test = model_selection.train_test_split(torch.arange(y.numel()).numpy(), test_size=test_fraction,
                                                   random_state=seed, stratify=y.numpy())
    return _Split(torch.as_tensor(train), torch.as_tensor(test))


def _fit(x_train: Tensor, y_train: Tensor, max_iter: int) -> Any:
    linear_model, _, _, pipeline, preprocessing = _sklearn()
    probe = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=max_iter))
    return probe.fit(x_train.double().numpy(), y_train.numpy())


def mean_difference(z: Tensor, y: Tensor) -> Tensor:
    """Per latent, mean activation over positives minus mean over negatives (``[d_sae]``, float64)."""
    z = z.double()
    return z[y].mean(0) - z[~y].mean(0)


def _inputs(sae: Any, features: Tensor, labels: Any) -> tuple[Tensor, Tensor]:
    z = encode_rows(sae, features)
    named = concepts(labels, features.shape[0])
    if len(named) != 1:
        raise MechkitError(f"pass the labels of one concept ([n] 0/1), got {len(named)} concepts")
    return z, next(iter(named.values()))


def k_sparse_probing(sae: Any, features: Tensor, labels: Any, ks: Sequence[int] = (1, 2, 5, 10, 20), *,
                     test_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> SparseProbingResult:
    """Held-out accuracy of logistic probes on the top-k latents (ranked on the training split by the
    absolute difference of class means), for each k in ``ks``, and of the full probe on ``features``."""
    z, y = _inputs(sae, features, labels)
    ks = sorted({min(int(k), z.shape[1]) for k in ks})
    if not ks or ks[0] < 1:
        raise MechkitError(f"ks must be positive integers, got {list(ks)}")
    split = _split(y, test_fraction, seed)
    diff = mean_difference(z[split.train], y[split.train])
    ranking = diff.abs().argsort(descending=True, stable=True)[:ks[-1]]
    accuracy = []
    for k in ks:
        cols = ranking[:k]
        probe = _fit(z[split.train][:, cols], y[split.train], max_iter)
        accuracy.append(probe.score(z[split.test][:, cols].double().numpy(), y[split.test].numpy()))
    full = _fit(features[split.train], y[split.train], max_iter)
    baseline = full.score(features[split.test].double().numpy(), y[split.test].numpy())
    return SparseProbingResult(
        ks=ks, accuracy=torch.tensor(accuracy, dtype=torch.float64), baseline_accuracy=float(baseline),
        ranking=ranking, mean_difference=diff[ranking], n_train=split.train.numel(), n_test=split.test.numel(),
        config={"ks": ks, "test_fraction": test_fraction, "seed": seed, "max_iter": max_iter},
        provenance=provenance(seed=seed),
    )


def main_latents(z: Tensor, y: Tensor, *, max_main: int = 10, f1_gain: float = 0.03, max_iter: int = 1000) -> Tensor:
    """The concept's main latents on ``(z, y)``: top latents by positive mean difference, added while one
    more raises the k-sparse probe's F1 (fitted and scored on these items) by more than ``f1_gain``."""
    _, metrics, _, _, _ = _sklearn()
    diff = mean_difference(z, y)
    order = diff.argsort(descending=True, stable=True)
    order = order[diff[order] > 0][:max_main]
    if order.numel() == 0:
        raise MechkitError("no latent is more active on the positives than on the negatives: no main latent")
    best, chosen = -1.0, 1
    for k in range(1, order.numel() + 1):
        cols = order[:k]
        f1 = metrics.f1_score(y.numpy(), _fit(z[:, cols], y, max_iter).predict(z[:, cols].double().numpy()))
        if k > 1 and f1 - best <= f1_gain:
            break
        best, chosen = f1, k
    return order[:chosen]


@dataclass(frozen=True, kw_only=True)
class AbsorptionConfig(Config):
    """How feature absorption is measured (the keywords of :func:`feature_absorption`)."""

    max_main: int = option(10, help="most main latents considered")
    f1_gain: float = option(0.03, help="a further main latent must raise the training F1 by more than this")
    cos_threshold: float = option(0.025, help="a latent is aligned with the probe when cos(decoder, probe) ≥ this")
    share: float = option(0.5, help="aligned latents must supply at least this share of the probe projection")
    test_fraction: float = option(0.2, help="held-out share of the items (stratified)")
    seed: int = option(0, help="seed of the train/test split")

    def check(self) -> None:
        if self.max_main < 1 or not 0 < self.share <= 1 or not 0 < self.test_fraction < 1:
            raise ConfigError("max_main must be ≥ 1, share in (0, 1] and test_fraction in (0, 1)")


def feature_absorption(sae: Any, features: Tensor, labels: Any, probe_direction: Any,
                       config: AbsorptionConfig | None = None, *, main: Sequence[int] | None = None,
                       **options: Any) -> AbsorptionResult:
    """How often the concept is absorbed by other latents where its main latents stay silent.

    ``probe_direction``: the concept's probe (a tensor or an object with ``.direction``); ``main``:
    the main latents, else chosen on the training split (:func:`main_latents`); settings: the fields
    of :class:`AbsorptionConfig`. See the module docstring for the definition; the figures are over
    the held-out positive items.
    """
    cfg = AbsorptionConfig.from_dict(options) if config is None else config.replace(**options)
    z, y = _inputs(sae, features, labels)
    split = _split(y, cfg.test_fraction, cfg.seed)
    chosen = (main_latents(z[split.train], y[split.train], max_main=cfg.max_main, f1_gain=cfg.f1_gain)
              if main is None else torch.as_tensor(list(main), dtype=torch.long))
    probe = as_direction(probe_direction, "probe_direction")
    decoder = decoder_directions(sae).float()
    if probe.shape[0] != decoder.shape[1]:
        raise MechkitError(f"the probe direction is {probe.shape[0]}-d but the SAE writes {decoder.shape[1]}-d")
    along = decoder @ probe  # d_j · p̂: each latent's write onto the probe direction per unit
    aligned = along / decoder.norm(dim=1).clamp_min(1e-12) >= cfg.cos_threshold
    aligned[chosen] = False
    zp = z[split.test[y[split.test]]]  # held-out positives
    missed = ~(zp[:, chosen] > 0).any(1)
    contribution = (zp * along).clamp_min(0) * (zp > 0)
    absorbing = (contribution * aligned).sum(1)
    fraction = absorbing / contribution.sum(1).clamp_min(1e-12)
    absorbed = missed & (absorbing > 0) & (fraction >= cfg.share)
    top = (contribution * aligned)[absorbed].argmax(1) if bool(absorbed.any()) else torch.zeros(0, dtype=torch.long)
    latents, counts = top.unique(return_counts=True)
    rank = counts.argsort(descending=True, stable=True)
    n_pos = zp.shape[0]
    return AbsorptionResult(
        main_latents=chosen, absorption_rate=float(absorbed.sum()) / n_pos, missed_rate=float(missed.sum()) / n_pos,
        mean_absorbed_fraction=float(fraction[missed].mean()) if bool(missed.any()) else 0.0,
        n_positive=n_pos, n_missed=int(missed.sum()), n_absorbed=int(absorbed.sum()),
        absorbing_latents=latents[rank], absorbing_counts=counts[rank],
        config={**cfg.to_dict(), "main": None if main is None else [int(m) for m in main]},
        provenance=provenance(seed=cfg.seed),
    )


@dataclass(frozen=True, eq=False)
class SparseProbingResult(Result):
    """Held-out accuracy of the k-sparse probe per k (``accuracy`` ``[len(ks)]``) and of the full probe
    on the raw features (``baseline_accuracy``); ``ranking``: the latents by |mean difference|, with
    their signed ``mean_difference`` (positives − negatives) on the training split."""

    ks: list[int]
    accuracy: Tensor
    baseline_accuracy: float
    ranking: Tensor
    mean_difference: Tensor
    n_train: int
    n_test: int

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"k": self.ks, "accuracy": self.accuracy.tolist(),
                             "baseline_accuracy": self.baseline_accuracy,
                             "latents": [self.ranking[:k].tolist() for k in self.ks]})

    def _plot(self, fig: Any) -> None:
        ax = fig.add_subplot()
        ax.plot(self.ks, self.accuracy.tolist(), marker="o", label="top-k latents")
        ax.axhline(self.baseline_accuracy, color="C1", ls="--", label="full probe on the features")
        ax.set_xscale("log")
        viz.label(ax, x="k (latents)", y="held-out accuracy", title="k-sparse probing")


@dataclass(frozen=True, eq=False)
class AbsorptionResult(Result):
    """Feature absorption on one concept over the ``n_positive`` held-out positives.

    ``missed_rate``: share where no main latent fires; ``absorption_rate``: share absorbed by aligned
    latents (see :mod:`mechkit.sae.sparse_probing`); ``mean_absorbed_fraction``: over the missed items,
    the mean share of the probe projection the aligned latents supply; ``absorbing_latents`` /
    ``absorbing_counts``: the latent contributing most on each absorbed item, most frequent first.
    """

    main_latents: Tensor
    absorption_rate: float
    missed_rate: float
    mean_absorbed_fraction: float
    n_positive: int
    n_missed: int
    n_absorbed: int
    absorbing_latents: Tensor
    absorbing_counts: Tensor

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{"main_latents": self.main_latents.tolist(), "absorption_rate": self.absorption_rate,
                              "missed_rate": self.missed_rate, "mean_absorbed_fraction": self.mean_absorbed_fraction,
                              "n_positive": self.n_positive, "n_missed": self.n_missed,
                              "n_absorbed": self.n_absorbed}])

    def _plot(self, fig: Any, top: int = 20) -> None:
        ax = fig.add_subplot()
        latents = self.absorbing_latents[:top].tolist()
        ax.bar(range(len(latents)), self.absorbing_counts[:top].tolist(), color="C0")
        ax.set_xticks(range(len(latents)), [str(i) for i in latents], rotation=90, fontsize="small")
        viz.label(ax, x="absorbing latent", y="absorbed items",
                  title=f"absorption rate {self.absorption_rate:.1%} (main latents miss {self.missed_rate:.1%})")
