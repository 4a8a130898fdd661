"""The house style every mechkit figure shares: figure creation, axes labelling, heatmaps, saving.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot, so plotting never adds
to pyplot's global list of open figures (no leak across a sweep's hundred plots, no second copy
in a notebook, which shows a returned figure as the cell's value). matplotlib is imported on the
first figure, not when :mod:`mechkit.viz` is imported. Typical use inside ``Result._plot``::

    ax = fig.add_subplot()
    viz.heatmap(ax, effect, x=tokens, y=[f"L{i}" for i in layers], diverging=True, colorbar="logit diff")
    viz.label(ax, x="position", y="layer", title="Activation patching")
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechkit.atomic import atomic_write_bytes
from mechkit.errors import MechkitError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

SIZE = (6.0, 3.6)  # inches; one panel at a readable font size
SEQUENTIAL, DIVERGING = "Blues", "RdBu_r"  # magnitudes, and signed effects centred on zero
FORMATS = ("png", "pdf", "svg")


def figure(size: tuple[float, float] | None = None) -> Figure:
    """A new, empty Figure with constrained layout (``size`` in inches, default :data:`SIZE`)."""
    from matplotlib.figure import Figure

    return Figure(figsize=size or SIZE, layout="constrained")


def label(ax: Axes, *, x: str | None = None, y: str | None = None, title: str | None = None,
          grid: bool = True) -> Axes:
    """Axis labels and title in the house style; a light grid (never over an image) and a frameless
    legend when something is labelled."""
    if x is not None:
        ax.set_xlabel(x)
    if y is not None:
        ax.set_ylabel(y)
    if title is not None:
        ax.set_title(title, fontsize="medium")
    ax.spines[["top", "right"]].set_visible(False)
    if grid and not ax.images:
        ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # only artists given a label
        ax.legend(frameon=False, fontsize="small")
    return ax


def heatmap(ax: Axes, values: Any, *, x: Sequence[str] | None = None, y: Sequence[str] | None = None,
            diverging: bool = False, vmin: float | None = None, vmax: float | None = None,
            colorbar: str | None = None) -> AxesImage:
    """``values`` [rows, cols] as an image; ``diverging`` centres the colours on zero (signed effects).

    ``x`` / ``y`` label the columns / rows; ``colorbar`` (its label) adds a colour bar.
    """
    import numpy as np

    data = as_array(values)
    if data.ndim != 2:
        raise MechkitError(f"heatmap takes a [rows, cols] array, got shape {tuple(data.shape)}; select one slice first")
    if diverging and vmin is None and vmax is None:
        bound = float(np.nanmax(np.abs(data), initial=0.0)) or 1.0  # an all-zero map still gets a scale
        vmin, vmax = -bound, bound
    image = ax.imshow(data, cmap=DIVERGING if diverging else SEQUENTIAL, vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    if x is not None:
        ax.set_xticks(range(len(x)), list(x), rotation=90 if max(map(len, x), default=0) > 3 else 0,
                      fontsize="small")
    if y is not None:
        ax.set_yticks(range(len(y)), list(y), fontsize="small")
    if colorbar is not None:
        ax.figure.colorbar(image, ax=ax, shrink=0.8, label=colorbar)
    return image


def save(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: png, pdf or svg), atomically."""
    path = Path(path)
    kind = path.suffix.removeprefix(".").lower()
    if kind not in FORMATS:
        raise MechkitError(f"cannot save a figure as {path.name!r}; use a {', '.join(FORMATS)} suffix")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def as_array(values: Any) -> Any:
    """A float numpy array of a tensor (any device, any dtype) or an array-like."""
    import numpy as np

    detach = getattr(values, "detach", None)  # a torch tensor, without importing torch here
    if detach is not None:
        values = detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


__all__ = ["DIVERGING", "FORMATS", "SEQUENTIAL", "SIZE", "as_array", "figure", "heatmap", "label", "save"]
