"""The result of a probe sweep: scores per site, their intervals, controls and the concept depth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mechkit import viz
from mechkit.probing.metrics import ConceptDepth, concept_depth
from mechkit.results import Result


@dataclass(frozen=True, eq=False)
class ProbeSweepResult(Result):
    """One probe per site. Tensors are ``[S]`` over sites (``fold_accuracy`` is ``[S, F]``).

    ``accuracy``, ``f1`` and ``auroc`` are test scores averaged over folds; ``ci_low`` / ``ci_high``
    a bootstrap interval of the accuracy over test items (pooled over folds); ``control_accuracy``
    the same probe on the control task (None when not run), so ``selectivity = accuracy − control``.
    """

    sites: list[str]
    layers: list[int]
    accuracy: Tensor
    f1: Tensor
    auroc: Tensor
    ci_low: Tensor
    ci_high: Tensor
    fold_accuracy: Tensor
    control_accuracy: Tensor | None = None
    chance: float = 0.5
    concept: str = "concept"
    n_train: int = 0
    n_test: int = 0

    @property
    def selectivity(self) -> Tensor | None:
        return None if self.control_accuracy is None else self.accuracy - self.control_accuracy

    def concept_depth(self, **kwargs: Any) -> ConceptDepth:
        """Jump, converging point and peak as fractions of the depth (METHODS §1.1)."""
        return concept_depth(self.accuracy, self.ci_low, self.chance, **kwargs)

    def best(self) -> tuple[str, float]:
        i = int(self.accuracy.argmax())
        return self.sites[i], float(self.accuracy[i])

    def to_frame(self) -> Any:
        import pandas as pd

        frame = pd.DataFrame({
            "concept": self.concept, "site": self.sites, "layer": self.layers,
            "accuracy": self.accuracy.tolist(), "ci_low": self.ci_low.tolist(), "ci_high": self.ci_high.tolist(),
            "f1": self.f1.tolist(), "auroc": self.auroc.tolist(),
        })
        if self.control_accuracy is not None:
            frame["control_accuracy"] = self.control_accuracy.tolist()
            frame["selectivity"] = self.selectivity.tolist()
        return frame

    def _plot(self, fig: Any, others: Sequence[ProbeSweepResult] = (), control: bool = True) -> None:
        """Accuracy by layer with its interval; ``others`` adds more concepts to the same axes."""
        ax = fig.add_subplot()
        for result in (self, *others):
            x = result.layers
            line = ax.plot(x, result.accuracy.tolist(), marker="o", ms=3, label=result.concept)[0]
            ax.fill_between(x, result.ci_low.tolist(), result.ci_high.tolist(), color=line.get_color(), alpha=0.15)
            if control and result.control_accuracy is not None:
                ax.plot(x, result.control_accuracy.tolist(), ls=":", color=line.get_color(), lw=1)
            depth = result.concept_depth()
            if depth.jump is not None:
                ax.axvline(x[round(depth.jump * len(x)) - 1], color=line.get_color(), ls="--", lw=0.8, alpha=0.6)
        ax.axhline(self.chance, color="0.6", ls="--", lw=1, label="chance")
        ax.set_ylim(min(self.chance - 0.05, ax.get_ylim()[0]), 1.01)
        ax.xaxis.get_major_locator().set_params(integer=True)
        title = "Linear probe by layer" + (" (dotted: control task; dashed: jump)" if control else "")
        viz.label(ax, x="layer", y="test accuracy", title=title)
