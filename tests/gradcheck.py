"""Central finite differences of a metric along a direction at one site (the gradient tests' reference)."""

from __future__ import annotations

import torch

from mechkit.interventions import Replace


def finite_difference(model, ids, site: str, act: torch.Tensor, direction: torch.Tensor, metric, eps: float = 1e-6):
    """(metric(act + eps·d) − metric(act − eps·d)) / 2eps, with the site replaced in a fresh forward."""
    plus = model.run_with_interventions(ids, {site: Replace(source=act + eps * direction)}).logits
    minus = model.run_with_interventions(ids, {site: Replace(source=act - eps * direction)}).logits
    return (metric(plus, None) - metric(minus, None)) / (2 * eps)
