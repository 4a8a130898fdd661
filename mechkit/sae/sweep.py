"""A sweep over SAE settings (k, L1 coefficient, width, ...): train each, evaluate each in the model,
and return the L0–FVU and L0–CE-recovered Pareto fronts as an :class:`SAESweepResult`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from mechkit.errors import MechkitError
from mechkit.provenance import provenance
from mechkit.sae.config import TrainConfig
from mechkit.sae.evaluate import EvalConfig, evaluate_sae
from mechkit.sae.result import SAESweepResult
from mechkit.sae.train import train_sae

__all__ = ["sae_sweep"]


def sae_sweep(source: Any, site: str, model: Any, prompts: Sequence[str], grid: Mapping[str, Sequence[Any]], *,
              config: TrainConfig | None = None, eval_config: EvalConfig | None = None) -> SAESweepResult:
    """Train one SAE per combination of ``grid`` (``{"k": [8, 16, 32]}``; several keys form their
    product) on ``source`` at ``site`` with the rest of ``config``, evaluate each on ``prompts``
    through ``model``, and return the sweep (``.plot()`` shows both Pareto fronts)."""
    base = config or TrainConfig()
    if not grid or not all(isinstance(v, Sequence) and not isinstance(v, str) and len(v) for v in grid.values()):
        raise MechkitError("grid must map option names to non-empty lists of values, e.g. {'k': [8, 16, 32]}")
    unknown = sorted(set(grid) - set(base.to_dict()))
    if unknown:
        raise MechkitError(f"unknown training options in grid: {', '.join(unknown)}; "
                           f"choose from {', '.join(sorted(base.to_dict()))}")
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    evals = []
    for setting in settings:
        sae = train_sae(source, site, base.replace(**setting))
        evals.append(evaluate_sae(model, sae, site, prompts, eval_config))
    return SAESweepResult.from_evaluations(
        evals[0].site, settings, evals, config={"train": base.to_dict(), "grid": {k: list(v) for k, v in grid.items()}},
        provenance=provenance(model, [evals[0].site]))
