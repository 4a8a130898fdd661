"""The result of the pathway monitor: per-checkpoint metrics of the memorized samples, their correlation
with test accuracy, and the paper-style figure (each metric against checkpoints, test accuracy on a twin axis)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.moe.functional import pearson, spearman
from mechkit.results import Result

__all__ = ["PathwayMonitorResult"]


@dataclass(frozen=True, eq=False)
class PathwayMonitorResult(Result):
    """Per checkpoint (``steps``): ``distance`` ``[taus, checkpoints]`` and ``layer_distance``
    ``[taus, checkpoints, MoE layers]`` (mean Levenshtein pathway distance over the memorized group),
    ``smoothness`` (their mean smoothness; NaN with fewer than 3 MoE layers), ``group_size``, and the loss /
    accuracy of all training and test samples. Metrics are NaN where the group is below ``min_group``.
    ``memorized_since`` / ``generalized_at``: per training / test sample, the step from which it is memorized /
    correct to the end (−1: never)."""

    steps: list[int]
    taus: list[float]
    distance: Tensor
    layer_distance: Tensor
    smoothness: Tensor
    group_size: Tensor
    train_loss: Tensor
    train_accuracy: Tensor
    test_loss: Tensor
    test_accuracy: Tensor
    memorized_since: Tensor
    generalized_at: Tensor
    epsilon: float

    @property
    def complexity(self) -> Tensor:
        """Pathway complexity 1 − smoothness (the paper's formula; falls as generalization rises)."""
        return 1 - self.smoothness

    @property
    def measured(self) -> Tensor:
        """Checkpoints after memorization: those whose memorized group is large enough to measure."""
        return ~self.distance[0].isnan()

    def to_frame(self) -> Any:
        """One row per checkpoint and τ."""
        import pandas as pd

        rows = [{"step": step, "tau": tau, "distance": float(self.distance[t, c]),
                 "smoothness": float(self.smoothness[c]), "complexity": float(self.complexity[c]),
                 "group_size": int(self.group_size[c]), "train_loss": float(self.train_loss[c]),
                 "train_accuracy": float(self.train_accuracy[c]), "test_loss": float(self.test_loss[c]),
                 "test_accuracy": float(self.test_accuracy[c])}
                for t, tau in enumerate(self.taus) for c, step in enumerate(self.steps)]
        return pd.DataFrame(rows)

    def correlations(self) -> Any:
        """Pearson and Spearman correlation of each metric with test accuracy over the measured checkpoints."""
        import pandas as pd

        keep = self.measured
        acc = self.test_accuracy[keep]
        series = [(f"distance (tau {tau})", tau, self.distance[t][keep]) for t, tau in enumerate(self.taus)]
        series += [("smoothness", None, self.smoothness[keep]), ("complexity", None, self.complexity[keep]),
                   ("train loss", None, self.train_loss[keep])]
        return pd.DataFrame([{"metric": name, "tau": tau, "pearson": pearson(x, acc), "spearman": spearman(x, acc),
                              "checkpoints": int(keep.sum())} for name, tau, x in series])

    def _plot(self, fig: Any, tau: float | None = None) -> None:
        fig.set_size_inches(13.5, 3.6)
        steps, keep = torch.tensor(self.steps), self.measured
        panels = [("pathway distance", [(f"τ {t}", self.distance[i]) for i, t in enumerate(self.taus)
                                        if tau is None or math.isclose(t, tau)])]
        if not self.smoothness.isnan().all():
            panels.append(("smoothness", [("smoothness", self.smoothness)]))
        panels.append(("training loss", [("train loss", self.train_loss)]))
        axes = fig.subplots(1, len(panels))
        for ax, (name, lines) in zip(axes, panels):
            for label, y in lines:
                part = keep if name != "training loss" else torch.ones_like(keep)
                ax.plot(steps[part].tolist(), y[part].tolist(), marker="o", ms=3, label=label)
            twin = ax.twinx()
            twin.plot(self.steps, self.test_accuracy.tolist(), color="0.45", ls="--", lw=1)
            twin.set_ylabel("test accuracy (dashed)", color="0.45")
            twin.set_ylim(0, 1.02)
            if keep.any():
                ax.axvline(self.steps[int(keep.nonzero()[0])], color="0.7", lw=0.8)
            r = pearson(next(iter(lines))[1][keep], self.test_accuracy[keep]) if keep.any() else float("nan")
            viz.label(ax, x="step", y=name, title=f"{name} (memorized samples)  r = {r:+.2f}"
                      if name != "training loss" else f"training loss  r = {r:+.2f}")
