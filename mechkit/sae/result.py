"""Results of SAE evaluation: one SAE (:class:`SAEEvalResult`) and a sweep of settings with its
Pareto fronts (:class:`SAESweepResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.results import Result

__all__ = ["SAEEvalResult", "SAESweepResult", "pareto_front"]

METRICS = ("l0", "fvu", "cosine", "dead_fraction", "dense_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
           "recovered_zero", "recovered_mean", "kl")


@dataclass(frozen=True, eq=False)
class SAEEvalResult(Result):
    """An SAE evaluated in its model over real tokens (see :func:`mechkit.sae.evaluate_sae`).

    ``l0``: mean active latents per token; ``fvu``: Σ‖x − x̂‖² / Σ‖x − mean x‖²; ``cosine``: mean
    cos(x, x̂); ``dead_fraction`` / ``dense_fraction``: latents never active / active on more than
    the dense threshold over the first ``dead_window`` tokens; ``ce_*``: next-token cross-entropy
    (nats per prediction) clean, with the reconstruction spliced in, with the site zeroed and with
    it set to its mean; ``recovered_zero`` / ``recovered_mean``: CE-loss recovered against each
    baseline; ``kl``: mean KL(clean ‖ spliced) per real position; ``firing_frequency``: ``[d_sae]``.
    """

    site: str
    n_tokens: int
    n_predictions: int
    l0: float
    fvu: float
    cosine: float
    dead_fraction: float
    dense_fraction: float
    dead_window: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    recovered_zero: float
    recovered_mean: float
    kl: float
    firing_frequency: Tensor

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    def metrics(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in METRICS}

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{"site": self.site, **self.metrics(), "n_tokens": self.n_tokens}])

    def _plot(self, fig: Any, bins: int = 40) -> None:
        plot_frequencies(fig.add_subplot(), self.firing_frequency, bins=bins, window=self.dead_window)


def plot_frequencies(ax: Any, frequency: Tensor, *, bins: int = 40, window: int | None = None) -> None:
    """Histogram of log10 firing frequency over the latents that fire; dead latents counted in the title."""
    alive = frequency[frequency > 0].double()
    dead = int((frequency == 0).sum())
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=bins, color="C0")
    over = f" over {window:,} tokens" if window else ""
    viz.label(ax, x="log10 firing frequency", y="latents",
              title=f"{alive.numel()} latents fire, {dead} dead{over}")


def pareto_front(cost: Sequence[float], score: Sequence[float], *, higher_is_better: bool) -> list[int]:
    """Indices of the settings no other setting beats on both axes (lower ``cost`` and better ``score``),
    ordered by cost."""
    points = sorted(range(len(cost)), key=lambda i: (cost[i], -score[i] if higher_is_better else score[i]))
    sign = 1.0 if higher_is_better else -1.0
    front: list[int] = []
    for i in points:
        if not front or sign * score[i] > sign * score[front[-1]]:
            front.append(i)
    return front


@dataclass(frozen=True, eq=False)
class SAESweepResult(Result):
    """Several SAE settings trained and evaluated at one site: tensors are ``[n_settings]``.

    ``settings`` lists the varied options per setting (e.g. ``{"k": 16}``); ``recovered`` uses the
    mean-ablation baseline, ``recovered_zero`` the zero-ablation one.
    """

    site: str
    settings: list[dict[str, Any]]
    l0: Tensor
    fvu: Tensor
    recovered: Tensor
    recovered_zero: Tensor
    kl: Tensor
    dead_fraction: Tensor

    @classmethod
    def from_evaluations(cls, site: str, settings: list[dict[str, Any]], evals: Sequence[SAEEvalResult],
                         **meta: Any) -> SAESweepResult:
        def column(name: str) -> Tensor:
            return torch.tensor([getattr(e, name) for e in evals], dtype=torch.float64)

        return cls(site=site, settings=settings, l0=column("l0"), fvu=column("fvu"),
                   recovered=column("recovered_mean"), recovered_zero=column("recovered_zero"), kl=column("kl"),
                   dead_fraction=column("dead_fraction"), **meta)

    def fronts(self) -> dict[str, list[int]]:
        """The Pareto-optimal settings for L0–FVU (lower both) and L0–CE-recovered (lower L0, higher recovery)."""
        l0 = self.l0.tolist()
        return {"fvu": pareto_front(l0, self.fvu.tolist(), higher_is_better=False),
                "recovered": pareto_front(l0, self.recovered.tolist(), higher_is_better=True)}

    def to_frame(self) -> Any:
        import pandas as pd

        fronts = self.fronts()
        rows = []
        for i, setting in enumerate(self.settings):
            rows.append({"site": self.site, **setting, "l0": float(self.l0[i]), "fvu": float(self.fvu[i]),
                         "recovered": float(self.recovered[i]), "recovered_zero": float(self.recovered_zero[i]),
                         "kl": float(self.kl[i]), "dead_fraction": float(self.dead_fraction[i]),
                         "pareto_fvu": i in fronts["fvu"], "pareto_recovered": i in fronts["recovered"]})
        return pd.DataFrame(rows)

    def _plot(self, fig: Any) -> None:
        fig.set_size_inches(11, 4.2)
        fronts = self.fronts()
        labels = [", ".join(f"{k}={v}" for k, v in s.items()) for s in self.settings]
        for col, (key, values, name) in enumerate((("fvu", self.fvu, "FVU"),
                                                   ("recovered", self.recovered, "CE-loss recovered (mean abl.)"))):
            ax = fig.add_subplot(1, 2, col + 1)
            ax.scatter(self.l0.tolist(), values.tolist(), color="C0", zorder=2)
            front = fronts[key]
            ax.plot([float(self.l0[i]) for i in front], [float(values[i]) for i in front], color="C1",
                    label="Pareto front", zorder=1)
            for i, text in enumerate(labels):
                ax.annotate(text, (float(self.l0[i]), float(values[i])), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xscale("log")
            viz.label(ax, x="L0 (active latents per token)", y=name, title=f"L0–{name.split(' ')[0]} at {self.site}")
            ax.legend(fontsize=8)
