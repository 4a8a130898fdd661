"""Interventions: small callables that map a site's activation to a new one.

Each intervention computes a full-shape replacement and, when selectors are given, applies it
only at the selected positions / heads / neurons / experts (``torch.where`` with a broadcast
mask), so every kind composes with every selector. Selectors take an int, a list of ints, a
slice, or (``positions`` only) a boolean ``[batch, pos]`` mask for per-example positions.

    model.run_with_interventions(x, {"blocks.2.attn.z": Zero(heads=[1, 3])})
    model.run_with_interventions(x, {"blocks.1.resid_post": Replace(clean_cache, positions=-1)})
    model.run_with_interventions(x, {"blocks.0.moe.topk.e2": Zero()})   # ablate expert 2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.sites import Site

Index = Union[int, Sequence[int], slice, Tensor, None]

_SELECTOR_AXES = {"positions": "pos", "heads": "head", "neurons": "neuron", "experts": "expert"}


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Base class. Subclasses implement :meth:`replacement`."""

    positions: Index = None
    heads: Index = None
    neurons: Index = None
    experts: Index = None

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        raise NotImplementedError

    def __call__(self, act: Tensor, site: Site) -> Tensor:
        new = self.replacement(act, site)
        if new.shape != act.shape:
            new = new.expand_as(act) if _broadcasts(new.shape, act.shape) else _shape_error(self, act, new, site)
        mask = selection_mask(act, site, self._selectors())
        out = new if mask is None else torch.where(mask, new.to(act.dtype), act)
        return out.to(act.dtype)

    def _selectors(self) -> dict[str, Index]:
        return {_SELECTOR_AXES[k]: getattr(self, k) for k in _SELECTOR_AXES if getattr(self, k) is not None}


def _broadcasts(src: torch.Size, dst: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(src, dst) == dst
    except RuntimeError:
        return False


def _shape_error(iv: Intervention, act: Tensor, new: Tensor, site: Site) -> Tensor:
    raise MechkitError(
        f"{type(iv).__name__} at {site}: replacement has shape {tuple(new.shape)} but the site has "
        f"{tuple(act.shape)} (axes {site.axes}). If it comes from another run, the two inputs must "
        f"tokenize to the same length and batch size."
    )


def selection_mask(act: Tensor, site: Site, selectors: dict[str, Index]) -> Tensor | None:
    """Boolean mask broadcastable to ``act`` that is True where all selectors hold."""
    if not selectors:
        return None
    axes = site.axes if len(site.axes) == act.ndim else ()
    mask = torch.ones((1,) * act.ndim, dtype=torch.bool, device=act.device)
    for axis_name, index in selectors.items():
        if axis_name not in axes:
            raise MechkitError(
                f"site {site} has axes {axes or 'unknown'}; it cannot be selected by {axis_name!r}"
            )
        dim = axes.index(axis_name)
        if isinstance(index, Tensor) and index.dtype == torch.bool and index.ndim == 2:
            if axis_name != "pos" or tuple(index.shape) != (act.shape[0], act.shape[dim]):
                raise MechkitError(
                    f"a boolean position mask must have shape [batch, pos] = "
                    f"{(act.shape[0], act.shape[dim])}, got {tuple(index.shape)}"
                )
            shape = [1] * act.ndim
            shape[0], shape[dim] = index.shape
            mask = mask & index.to(act.device).reshape(shape)
            continue
        size = act.shape[dim]
        keep = torch.zeros(size, dtype=torch.bool, device=act.device)
        keep[_as_index(index, size, axis_name, site)] = True
        shape = [1] * act.ndim
        shape[dim] = size
        mask = mask & keep.reshape(shape)
    return mask


def _as_index(index: Index, size: int, axis: str, site: Site) -> Any:
    if isinstance(index, slice):
        return index
    values = [index] if isinstance(index, int) else [int(i) for i in index]
    bad = [i for i in values if not -size <= i < size]
    if bad:
        raise MechkitError(f"{axis} index {bad} out of range for {site}: that axis has {size} entries")
    return torch.tensor(values, dtype=torch.long)


# -- the interventions ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Replace(Intervention):
    """Patch in a value from another run: a tensor of the site's shape, or a cache holding the site."""

    source: Any

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        src = self.source[site] if not isinstance(self.source, Tensor) else self.source
        return src.to(device=act.device, dtype=act.dtype)


@dataclass(frozen=True, kw_only=True)
class Add(Intervention):
    """Steering: add ``coeff * vector`` (broadcast over leading axes)."""

    vector: Tensor
    coeff: float = 1.0

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        return act + self.coeff * self.vector.to(device=act.device, dtype=act.dtype)


@dataclass(frozen=True, kw_only=True)
class Zero(Intervention):
    """Zero ablation."""

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        return torch.zeros_like(act)


@dataclass(frozen=True, kw_only=True)
class Mean(Intervention):
    """Mean ablation: replace by ``value`` (e.g. a dataset mean), or by the batch mean when None."""

    value: Tensor | None = None

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        if self.value is None:
            return act.mean(dim=0, keepdim=True).expand_as(act)
        return self.value.to(device=act.device, dtype=act.dtype).expand_as(act)


@dataclass(frozen=True, kw_only=True)
class Resample(Intervention):
    """Resample ablation: each example gets the activation of another example (seeded permutation)."""

    source: Any = None
    seed: int = 0

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        src = act if self.source is None else (self.source if isinstance(self.source, Tensor) else self.source[site])
        n = src.shape[0]
        if n < 2:
            raise MechkitError("resample ablation needs at least 2 examples to draw from")
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen)
        # shift fixed points so no example keeps its own activation
        fixed = perm == torch.arange(n)
        perm[fixed] = (perm[fixed] + 1) % n
        rows = perm[torch.arange(act.shape[0]) % n]
        return src[rows].to(device=act.device, dtype=act.dtype)


@dataclass(frozen=True, kw_only=True)
class ProjectOut(Intervention):
    """Remove the span of ``directions`` ([d] or [k, d]) from the last axis: x − Q Qᵀ x."""

    directions: Tensor

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        d = self.directions.to(device=act.device, dtype=torch.float64)
        d = d.reshape(-1, d.shape[-1])
        if d.shape[-1] != act.shape[-1]:
            raise MechkitError(f"directions have width {d.shape[-1]} but {site} has width {act.shape[-1]}")
        q, _ = torch.linalg.qr(d.T)  # orthonormal basis of the span, [d, k]
        x = act.to(torch.float64)
        return (x - (x @ q) @ q.T).to(act.dtype)


@dataclass(frozen=True, kw_only=True)
class Scale(Intervention):
    """Multiply by ``factor``."""

    factor: float

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        return act * self.factor


@dataclass(frozen=True, kw_only=True)
class Apply(Intervention):
    """Any function ``fn(act, site) -> tensor`` of the site's shape."""

    fn: Callable[[Tensor, Site], Tensor] = field(repr=False)

    def replacement(self, act: Tensor, site: Site) -> Tensor:
        return self.fn(act, site)


__all__ = [
    "Add",
    "Apply",
    "Intervention",
    "Mean",
    "ProjectOut",
    "Replace",
    "Resample",
    "Scale",
    "Zero",
    "selection_mask",
]
