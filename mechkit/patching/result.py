"""The result of every patching method: scores over named axes, with the labels to read them.

``scores`` has one axis per entry of ``axes`` — e.g. ``("site", "position")`` for a residual sweep,
``("site", "head")`` for heads over all positions, ``("site", "head", "position")``, ``("site",
"neuron")``, or ``("sender", "receiver")`` for path patching. ``labels[axis]`` names the entries
(site names, ``"L3.H2"``, position labels such as ``"3: Mary"``). Cells that do not exist for any
prompt (a position beyond every prompt's length) are NaN. ``clean`` / ``corrupt`` hold the
prompt-mean metric of the unpatched runs, so raw scores and recovery can be told apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.errors import MechkitError
from mechkit.results import Result

__all__ = ["PatchingResult"]


@dataclass(frozen=True, eq=False)
class PatchingResult(Result):
    """Scores of one patching method. ``method``: ``"activation"``, ``"atp"``, ``"relp"``, ``"path"``,
    ``"ablation"``...; ``metric``: its name; ``normalized``: whether scores are :func:`recovery` values."""

    scores: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    method: str
    metric: str
    direction: str = "denoise"
    normalized: bool = True
    clean: float = math.nan
    corrupt: float = math.nan
    n_prompts: int = 0

    def __post_init__(self) -> None:
        if self.scores.dim() != len(self.axes):
            raise MechkitError(f"scores have {self.scores.dim()} axes but {len(self.axes)} names were given")
        for axis, size in zip(self.axes, self.scores.shape):
            if axis in self.labels and len(self.labels[axis]) != size:
                raise MechkitError(f"axis {axis!r} has {size} entries but {len(self.labels[axis])} labels")

    def label(self, axis: str) -> list[str]:
        size = self.scores.shape[self.axes.index(axis)]
        return list(self.labels.get(axis, [str(i) for i in range(size)]))

    def to_frame(self) -> Any:
        """One row per cell: a column per axis (its label), ``score``, plus the method and metric."""
        import pandas as pd

        index = torch.cartesian_prod(*[torch.arange(n) for n in self.scores.shape]).reshape(-1, self.scores.dim())
        names = {axis: self.label(axis) for axis in self.axes}
        flat = self.scores.reshape(-1).tolist()
        rows = [{**{axis: names[axis][int(i)] for axis, i in zip(self.axes, cell)}, "score": value}
                for cell, value in zip(index.tolist(), flat)]
        frame = pd.DataFrame(rows)
        frame["method"], frame["metric"] = self.method, self.metric
        return frame

    def top(self, k: int = 10, *, absolute: bool = True) -> Any:
        """The ``k`` cells with the largest scores (by magnitude when ``absolute``), NaN cells skipped."""
        frame = self.to_frame().dropna(subset=["score"])
        key = frame["score"].abs() if absolute else frame["score"]
        return frame.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def _plot(self, fig: Any, *, select: dict[str, int] | None = None, title: str | None = None) -> None:
        """A heatmap of the first two axes; ``select={"position": -1}`` fixes each further axis
        (default: its last entry, e.g. the final position)."""
        values, axes = self.scores, list(self.axes)
        for axis in self.axes[2:]:
            chosen = (select or {}).get(axis, -1)
            values = values.select(axes.index(axis), chosen)
            axes.remove(axis)
        if values.dim() == 1:
            values, axes = values[:, None], [axes[0], ""]
        rows, cols = axes[0], axes[1]
        fig.set_size_inches(max(5.0, 0.35 * values.shape[1] + 2.5), max(3.5, 0.3 * values.shape[0] + 1.5))
        ax = fig.add_subplot()
        what = "recovery" if self.normalized else self.metric
        viz.heatmap(ax, values, x=self.label(cols) if cols else None, y=self.label(rows), diverging=True,
                    colorbar=what)
        title = title or f"{self.method} patching ({self.metric}, {self.direction})"
        viz.label(ax, x=cols or None, y=rows, title=title)
