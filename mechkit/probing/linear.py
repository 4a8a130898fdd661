"""Linear probes with the scikit-learn estimator API, and the frozen artifact a fit produces.

``LogisticProbe(C=1.0).fit(X, y)`` returns the estimator (hyperparameters in ``__init__``, fitted
state ending in ``_``: ``coef_ [K, d]``, ``intercept_ [K]``, ``classes_``, ``n_iter_``) and keeps the
fitted probe as ``probe_``: a frozen :class:`LinearProbe` that is what plugs into a model —

- ``probe(x)`` gives decision scores ``[..., K]`` for activations ``[..., d]`` (tensor-callable);
- ``probe.directions`` (``[K, d]`` unit rows; ``probe.direction`` for binary probes) goes straight
  into ``ProjectOut(directions=probe)`` or ``Add(vector=...)`` for steering;
- ``model.splice(site, probe, name="probe")`` exposes its scores as the site
  ``<site>.probe.logit`` without changing the forward pass (gradients of a probe logit included);
- ``probe.save(folder)`` / ``LinearProbe.load(folder)``: safetensors + JSON.

Scores are ``x @ coef_.T + intercept_`` on raw activations: standardisation, when asked for, is
folded into the weights, so the artifact is one affine map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.probing import functional
from mechkit.probing.artifact import load_artifact, save_artifact
from mechkit.probing.checks import as_features, as_labels, encode_labels

KIND = "linear"


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted linear probe: ``scores = x @ weight + bias`` with ``weight [d, K]``, ``bias [K]``."""

    weight: Tensor
    bias: Tensor
    classes: Tensor
    method: str = "logistic"
    site: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    splice_parts = ("logit",)
    splice_name = "probe"

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d:
            raise MechkitError(f"the probe reads width {self.d}, got activations of width {x.shape[-1]}")
        return x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)

    decision_function = __call__

    def predict(self, x: Tensor) -> Tensor:
        s = self(x)
        index = (s[..., 0] > 0).long() if s.shape[-1] == 1 else s.argmax(-1)
        return self.classes[index]

    def predict_proba(self, x: Tensor) -> Tensor:
        if self.method != "logistic":
            raise MechkitError(f"a {self.method} probe gives scores, not probabilities; use decision_function")
        s = self(x)
        if s.shape[-1] == 1:
            p = torch.sigmoid(s[..., 0])
            return torch.stack([1 - p, p], -1)
        return torch.softmax(s, -1)

    def score(self, x: Tensor, y: Any) -> float:
        """Accuracy on ``(x, y)``."""
        x = as_features(x)
        return float((self.predict(x) == as_labels(y, x.shape[0], fitting=False)).float().mean())

    @property
    def directions(self) -> Tensor:
        """Unit directions ``[K, d]`` the probe reads (one row for a binary probe)."""
        w = self.weight.T
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @property
    def direction(self) -> Tensor:
        if self.weight.shape[1] != 1:
            raise MechkitError(f"a {len(self.classes)}-class probe has {self.weight.shape[1]} directions; "
                               "use .directions")
        return self.directions[0]

    def splice_forward(self, x: Tensor, tap: Any) -> Tensor:
        """Tap the scores as part ``logit`` and pass the activation on unchanged."""
        tap("logit", self(x))
        return x

    def save(self, folder: str | Path) -> Path:
        meta = {"method": self.method, "site": self.site, "meta": self.meta}
        return save_artifact(folder, KIND, {"weight": self.weight, "bias": self.bias, "classes": self.classes}, meta)

    @classmethod
    def load(cls, folder: str | Path) -> LinearProbe:
        _, t, meta = load_artifact(folder, KIND)
        return cls(t["weight"], t["bias"], t["classes"], meta["method"], meta["site"], meta.get("meta", {}))


class _LinearEstimator:
    """The scikit-learn half: ``fit`` solves one problem through :mod:`functional` and stores the artifact."""

    method = ""

    def fit(self, X: Any, y: Any, *, site: str | None = None) -> _LinearEstimator:
        x = as_features(X)
        labels = as_labels(y, x.shape[0])
        classes, index = encode_labels(labels)
        train = torch.ones(1, x.shape[0], dtype=torch.bool)
        fit = self._solve(x[None], index, train, len(classes))
        self.probe_ = LinearProbe(fit.weight[0, 0], fit.bias[0, 0], classes, self.method, site, self.get_params())
        self.n_iter_ = int(fit.n_iter[0, 0])
        return self

    def _solve(self, x: Tensor, y: Tensor, train: Tensor, n_classes: int) -> functional.LinearFit:
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def _fitted(self) -> LinearProbe:
        if not hasattr(self, "probe_"):
            raise MechkitError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        return self.probe_

    @property
    def coef_(self) -> Tensor:
        return self._fitted().weight.T

    @property
    def intercept_(self) -> Tensor:
        return self._fitted().bias

    @property
    def classes_(self) -> Tensor:
        return self._fitted().classes

    def __call__(self, x: Tensor) -> Tensor:
        return self._fitted()(x)

    def decision_function(self, X: Any) -> Tensor:
        s = self._fitted()(as_features(X))
        return s[..., 0] if s.shape[-1] == 1 else s

    def predict(self, X: Any) -> Tensor:
        return self._fitted().predict(as_features(X))

    def predict_proba(self, X: Any) -> Tensor:
        return self._fitted().predict_proba(as_features(X))

    def score(self, X: Any, y: Any) -> float:
        return self._fitted().score(X, y)

    @property
    def directions(self) -> Tensor:
        return self._fitted().directions

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class LogisticProbe(_LinearEstimator):
    """L2 logistic regression (scikit-learn's ``LogisticRegression`` objective; multinomial for > 2 classes)."""

    method = "logistic"

    def __init__(self, C: float = 1.0, *, standardize: bool = True, max_iter: int = 500, tol: float = 1e-4) -> None:
        self.C, self.standardize, self.max_iter, self.tol = C, standardize, max_iter, tol

    def _solve(self, x: Tensor, y: Tensor, train: Tensor, n_classes: int) -> functional.LinearFit:
        return functional.fit_logistic(x, y, train, n_classes=n_classes, C=self.C, standardize=self.standardize,
                                       max_iter=self.max_iter, tol=self.tol)


class RidgeProbe(_LinearEstimator):
    """Ridge classification (scikit-learn's ``RidgeClassifier``: ±1 targets, one column per class)."""

    method = "ridge"

    def __init__(self, alpha: float = 1.0, *, standardize: bool = True) -> None:
        self.alpha, self.standardize = alpha, standardize

    def _solve(self, x: Tensor, y: Tensor, train: Tensor, n_classes: int) -> functional.LinearFit:
        return functional.fit_ridge(x, y, train, n_classes=n_classes, alpha=self.alpha, standardize=self.standardize)


class MeanDiffProbe(_LinearEstimator):
    """Difference of class means (binary) or nearest class centroid (multiclass)."""

    method = "mean_diff"

    def __init__(self, *, standardize: bool = False) -> None:
        self.standardize = standardize

    def _solve(self, x: Tensor, y: Tensor, train: Tensor, n_classes: int) -> functional.LinearFit:
        return functional.fit_mean_diff(x, y, train, n_classes=n_classes, standardize=self.standardize)
