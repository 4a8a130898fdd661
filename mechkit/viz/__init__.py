"""Plotting: the shared figure style (:mod:`mechkit.viz.style`) and the figures built on it.

Functions here draw tensors and labels, never Result objects, so results, reports and notebooks
all reuse them; a Result's ``_plot`` calls them. Importing this package does not import matplotlib.
"""

from mechkit.viz.plots import plot_attention, plot_logit_lens, plot_norms
from mechkit.viz.style import DIVERGING, SEQUENTIAL, SIZE, as_array, figure, heatmap, label, save

__all__ = ["DIVERGING", "SEQUENTIAL", "SIZE", "as_array", "figure", "heatmap", "label", "plot_attention",
           "plot_logit_lens", "plot_norms", "save"]
