"""Figures for a model's activations (the demo tour): logit lens, one head's attention, norms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mechkit.viz.style import as_array, figure, heatmap, label

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor


def plot_logit_lens(probs: Tensor, token_labels: Sequence[str], title: str = "Logit lens") -> Figure:
    """Line plot of the log-probability of a few tokens decoded from each layer's residual stream.

    ``probs``: [layers, tokens] log-probabilities.
    """
    fig = figure((7, 3.6))
    ax = fig.add_subplot()
    values = as_array(probs)
    for j, token in enumerate(token_labels):
        ax.plot(range(values.shape[0]), values[:, j], marker="o", ms=3, label=repr(token))
    label(ax, x="layer (resid_post)", y="log p(next token)", title=title)
    return fig


def plot_attention(pattern: Tensor, tokens: Sequence[str], title: str = "Attention pattern") -> Figure:
    """Heatmap of one head's attention pattern [query, key]."""
    n = len(tokens)
    fig = figure((0.35 * n + 2.5, 0.35 * n + 1.5))
    ax = fig.add_subplot()
    heatmap(ax, pattern, x=tokens, y=tokens, vmin=0, vmax=1, colorbar="attention")
    label(ax, x="key", y="query", title=title)
    return fig


def plot_norms(norms: Tensor, title: str = "Residual-stream norm by layer") -> Figure:
    """Mean L2 norm of resid_post per layer ([layers])."""
    fig = figure((6, 3))
    ax = fig.add_subplot()
    ax.bar(range(len(norms)), as_array(norms), color="#4c72b0")
    label(ax, x="layer", y="mean ‖resid_post‖", title=title)
    return fig


__all__ = ["plot_attention", "plot_logit_lens", "plot_norms"]
