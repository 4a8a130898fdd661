"""Interventions: small callables that map a site's activation to a new one.

Each intervention computes a replacement and applies it only where its selectors hold
(``torch.where`` with a broadcast mask), so every kind composes with every selector. Selectors
(see :mod:`mechkit.selection`) name ``positions`` — counted among real tokens: ``"last"``,
``"real"``, ints, slices, boolean ``[batch, pos]`` masks — and ``heads``, ``neurons``,
``experts``, ``features`` (ints, lists, slices, boolean ``[n]`` or per-row ``[batch, n]`` masks).
Padding is never edited and never enters a statistic.

    model.run_with_interventions(x, {"blocks.2.attn.z": Zero(heads=[1, 3])})
    model.run_with_interventions(x, {"blocks.1.resid_post": Replace(source=clean_cache, positions="last")})
    model.run_with_interventions(x, {"blocks.0.moe.topk.e2": Zero()})   # ablate expert 2

Interventions compare by identity (``eq=False``): two equal-looking steering vectors are two
interventions. Any callable also works as an intervention: ``fn(act)`` (a fitted eraser, an
``nn.Module``) or ``fn(act, site)``; it must return a tensor of the site's shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.selection import (
    Index,
    RunContext,
    aligned_positions,
    alignment,
    check_selector,
    selection_mask,
)
from mechkit.sites import Site

_SELECTOR_AXES = {"positions": "pos", "heads": "head", "neurons": "neuron", "experts": "expert", "features": "feature"}


@dataclass(frozen=True, kw_only=True, eq=False)
class Intervention:
    """Base class. Subclasses implement :meth:`replacement` (the full-shape new value)."""

    positions: Index = None
    heads: Index = None
    neurons: Index = None
    experts: Index = None
    features: Index = None

    def __post_init__(self) -> None:
        for name in _SELECTOR_AXES:
            check_selector(name, getattr(self, name))

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        raise NotImplementedError

    def __call__(self, act: Tensor, site: Site, ctx: RunContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else _dense_context(act, site)
        mask = self.mask(act, site, ctx)
        return self.combine(act, self.replacement(act, site, ctx), mask, site)

    def mask(self, act: Tensor, site: Site, ctx: RunContext | None) -> Tensor | None:
        """Where this intervention writes (None: everywhere)."""
        return selection_mask(act, site.axes, self.selectors(), ctx, site)

    def combine(self, act: Tensor, new: Tensor, mask: Tensor | None, site: Site) -> Tensor:
        if new.shape != act.shape:
            if not _broadcasts(new.shape, act.shape):
                _shape_error(self, act, new, site)
            new = new.expand_as(act)
        new = new.to(act.dtype)
        return new if mask is None else torch.where(mask, new, act)

    def selectors(self) -> dict[str, Index]:
        return {axis: getattr(self, k) for k, axis in _SELECTOR_AXES.items() if getattr(self, k) is not None}


def _dense_context(act: Tensor, site: Site) -> RunContext | None:
    """Called outside a model run: every position of a ``pos`` axis counts as real."""
    axes = site.axes
    if "pos" not in axes or len(axes) != act.ndim:
        return None
    return RunContext.dense(act.shape[0], act.shape[axes.index("pos")], act.device)


def _broadcasts(src: torch.Size, dst: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(src, dst) == dst
    except RuntimeError:
        return False


def _shape_error(iv: Any, act: Tensor, new: Tensor, site: Site) -> None:
    raise MechkitError(
        f"{type(iv).__name__} at {site}: replacement has shape {tuple(new.shape)} but the site has "
        f"{tuple(act.shape)} (axes {site.axes}). If it comes from another run, the two runs must have "
        f"the same batch size and sequence length."
    )


# -- sources from other runs ---------------------------------------------------------------------


def source_tensor(source: Any, site: Site, act: Tensor, ctx: RunContext, positions: Index) -> Tensor:
    """The value of ``site`` in another run, laid out like ``act``.

    A tensor is taken as is. A cache (anything indexable by site with an ``attention_mask``) is
    realigned when its padding differs from this run's: the k-th real token of each row is paired
    with the k-th real token of the same source row (from the end for ``"last"`` / negative ints).
    """
    if isinstance(source, Tensor):
        return source
    if not isinstance(source, Mapping) and not hasattr(source, "__getitem__"):
        raise MechkitError(f"a source is a tensor or an ActivationCache, got {type(source).__name__}")
    src = source[site]
    src_mask = getattr(source, "attention_mask", None)
    if src_mask is None or (src_mask.shape == ctx.attention_mask.shape and torch.equal(src_mask.bool(), ctx.real)):
        return src
    if src.shape[0] != act.shape[0]:
        raise MechkitError(f"{site}: the source run has {src.shape[0]} rows but this run has {act.shape[0]}")
    axes = site.axes
    if "pos" not in axes or "key_pos" in axes or len(axes) != act.ndim:
        raise MechkitError(
            f"{site}: the source run is padded differently from this one and this site cannot be realigned "
            "token by token; run both with prompts of equal lengths"
        )
    index, valid = aligned_positions(ctx, RunContext(src_mask.to(ctx.attention_mask.device)), alignment(positions))
    dim = axes.index("pos")
    shape = [1] * act.ndim
    shape[0], shape[dim] = index.shape
    gather_index = index.reshape(shape).expand(*[s if d != dim else index.shape[1] for d, s in enumerate(src.shape)])
    aligned = src.gather(dim, gather_index)
    return _with_validity(aligned, valid, shape)


def _with_validity(aligned: Tensor, valid: Tensor, shape: list[int]) -> Tensor:
    """Mark target positions the source cannot supply with NaN, so a write there is caught."""
    if bool(valid.all()) or not aligned.is_floating_point():
        return aligned
    return torch.where(valid.reshape(shape), aligned, torch.full_like(aligned, float("nan")))


def _check_supplied(new: Tensor, mask: Tensor | None, site: Site) -> None:
    written = torch.isnan(new) if mask is None else torch.isnan(new) & mask
    if bool(written.any()):
        raise MechkitError(
            f"{site}: the source run has fewer real tokens than this run at some patched positions; "
            "patch positions both runs have (e.g. positions='last'), or use prompts of equal lengths"
        )


# -- the interventions ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class Replace(Intervention):
    """Patch in a value from another run: a tensor of the site's shape, or a cache holding the site."""

    source: Any

    def __call__(self, act: Tensor, site: Site, ctx: RunContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else _dense_context(act, site)
        mask = self.mask(act, site, ctx)
        new = self.replacement(act, site, ctx)
        if not isinstance(self.source, Tensor):
            _check_supplied(new, mask, site)
        return self.combine(act, new, mask, site)

    def replacement(self, act: Tensor, site: Site, ctx: RunContext | None) -> Tensor:
        if ctx is None or isinstance(self.source, Tensor):
            src = self.source if isinstance(self.source, Tensor) else self.source[site]
        else:
            src = source_tensor(self.source, site, act, ctx, self.positions)
        return src.to(device=act.device, dtype=act.dtype)


@dataclass(frozen=True, kw_only=True, eq=False)
class Add(Intervention):
    """Steering: add ``coeff * vector`` (broadcast over leading axes)."""

    vector: Tensor
    coeff: float = 1.0

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        return act + self.coeff * _vector(self.vector).to(device=act.device, dtype=act.dtype)


@dataclass(frozen=True, kw_only=True, eq=False)
class Zero(Intervention):
    """Zero ablation."""

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        return torch.zeros_like(act)


@dataclass(frozen=True, kw_only=True, eq=False)
class Mean(Intervention):
    """Mean ablation: replace by ``value`` (e.g. a dataset mean), or by a mean of this batch.

    With ``value=None`` the mean is over real tokens only: ``over="batch"`` averages each position
    over the rows where it is a real token; ``over="tokens"`` averages every real token into one
    vector.
    """

    value: Tensor | None = None
    over: str = "batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.over not in ("batch", "tokens"):
            raise MechkitError(f"Mean(over={self.over!r}): use 'batch' (per position) or 'tokens' (one vector)")

    def replacement(self, act: Tensor, site: Site, ctx: RunContext | None) -> Tensor:
        if self.value is not None:
            return self.value.to(device=act.device, dtype=act.dtype).expand_as(act)
        weights = _real_weights(act, site, ctx)
        dims = (0,) if self.over == "batch" else tuple(range(act.ndim - 1))
        if weights is None:
            return act.mean(dim=dims, keepdim=True).expand_as(act)
        total = (act * weights).sum(dim=dims, keepdim=True)
        count = weights.sum(dim=dims, keepdim=True)
        return torch.where(count > 0, total / count.clamp(min=1), act).expand_as(act)


def _real_weights(act: Tensor, site: Site, ctx: RunContext | None) -> Tensor | None:
    """1 at real tokens, 0 at padding, laid out along the site's pos axis (None: no pos axis)."""
    axes = site.axes
    if ctx is None or "pos" not in axes or len(axes) != act.ndim:
        return None
    dim = axes.index("pos")
    if act.shape[dim] != ctx.seq_len:
        return None
    shape = [1] * act.ndim
    shape[0], shape[dim] = ctx.attention_mask.shape
    return ctx.real.reshape(shape).to(act.dtype)


@dataclass(frozen=True, kw_only=True, eq=False)
class Resample(Intervention):
    """Resample ablation: each row gets the activation of another row (seeded, never its own).

    The donor of a row is drawn among the other rows (or the rows of ``source``) whose real tokens
    cover every position written in that row; tokens are paired as in :class:`Replace`.
    """

    source: Any = None
    seed: int = 0

    def __call__(self, act: Tensor, site: Site, ctx: RunContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else _dense_context(act, site)
        mask = self.mask(act, site, ctx)
        src, src_ctx = self._donors(act, site, ctx)
        n = src.shape[0]
        if n < 2 and self.source is None:
            raise MechkitError("resample ablation needs at least 2 examples to draw from")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        rows = [self._donor_row(i, order, src, src_ctx, act, site, ctx, mask) for i in range(act.shape[0])]
        return self.combine(act, torch.stack(rows).to(device=act.device, dtype=act.dtype), mask, site)

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:  # pragma: no cover - see __call__
        raise NotImplementedError("Resample computes its replacement row by row in __call__")

    def _donors(self, act: Tensor, site: Site, ctx: RunContext | None) -> tuple[Tensor, RunContext | None]:
        if self.source is None:
            return act, ctx
        if isinstance(self.source, Tensor):
            return self.source, None
        mask = getattr(self.source, "attention_mask", None)
        return self.source[site], (RunContext(mask) if mask is not None else None)

    def _donor_row(self, i: int, order: Tensor, src: Tensor, src_ctx: RunContext | None, act: Tensor,
                   site: Site, ctx: RunContext | None, mask: Tensor | None) -> Tensor:
        # Candidates follow the seeded permutation as one cycle, so no row draws itself.
        n = src.shape[0]
        if self.source is None:
            start = int((order == i).nonzero()[0]) + 1
            candidates = [int(order[(start + s) % n]) for s in range(n - 1)]
        else:
            candidates = [int(order[(i + s) % n]) for s in range(n)]
        needed = None if mask is None else mask.expand_as(act)[i]
        for j in candidates:
            row = _aligned_row(src, j, src_ctx, act, i, site, ctx, self.positions)
            missing = torch.isnan(row) if row.is_floating_point() else torch.zeros_like(row, dtype=torch.bool)
            if needed is not None:
                missing = missing & needed
            if not bool(missing.any()):
                return torch.nan_to_num(row, nan=0.0) if row.is_floating_point() else row
        raise MechkitError(
            f"{site}: no other row has enough real tokens to resample row {i} at the written positions; "
            "resample at positions='last', or group prompts by length"
        )


def _aligned_row(src: Tensor, j: int, src_ctx: RunContext | None, act: Tensor, i: int, site: Site,
                 ctx: RunContext | None, positions: Index) -> Tensor:
    """Row ``j`` of ``src`` laid out on row ``i``'s tokens (NaN where row j has no such token)."""
    axes = site.axes
    donor_ctx = src_ctx if src_ctx is not None else ctx
    if ctx is None or donor_ctx is None or "pos" not in axes or len(axes) != act.ndim or "key_pos" in axes:
        return src[j]
    target = RunContext(ctx.attention_mask[i : i + 1])
    donor = RunContext(donor_ctx.attention_mask[j : j + 1])
    index, valid = aligned_positions(target, donor, alignment(positions))
    dim = axes.index("pos") - 1
    row = src[j].index_select(dim, index[0])
    shape = [1] * row.ndim
    shape[dim] = index.shape[1]
    if not row.is_floating_point():
        return row
    return torch.where(valid[0].reshape(shape), row, torch.full_like(row, float("nan")))


@dataclass(frozen=True, kw_only=True, eq=False)
class ProjectOut(Intervention):
    """Remove the span of ``directions`` ([d] or [k, d], or an object with ``.directions``): x − Q Qᵀ x.

    The orthonormal basis Q is computed once, when the intervention is built.
    """

    directions: Any
    basis: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        d = _vector(self.directions).detach().to(torch.float64)
        d = d.reshape(-1, d.shape[-1])
        if not bool(torch.isfinite(d).all()) or not bool(d.abs().sum(-1).gt(0).all()):
            raise MechkitError("ProjectOut: directions must be finite and non-zero")
        q, _ = torch.linalg.qr(d.T)  # [d, k], orthonormal basis of the span
        object.__setattr__(self, "basis", q)

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        q = self.basis
        if q.shape[0] != act.shape[-1]:
            raise MechkitError(f"directions have width {q.shape[0]} but {site} has width {act.shape[-1]}")
        q = q.to(act.device)
        x = act.to(torch.float64)
        return (x - (x @ q) @ q.T).to(act.dtype)


@dataclass(frozen=True, kw_only=True, eq=False)
class Scale(Intervention):
    """Multiply by ``factor``."""

    factor: float

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        return act * self.factor


@dataclass(frozen=True, kw_only=True, eq=False)
class Apply(Intervention):
    """Any function of the activation: ``fn(act)`` or ``fn(act, site)``, returning the site's shape."""

    fn: Callable[..., Tensor] = field(repr=False)

    def replacement(self, act: Tensor, site: Site, ctx: RunContext) -> Tensor:
        return call_plain(self.fn, act, site)


# -- plain callables -----------------------------------------------------------------------------


def call_plain(fn: Callable[..., Any], act: Tensor, site: Site) -> Tensor:
    """Call ``fn(act)`` or ``fn(act, site)`` (by its signature) and check it returned a tensor."""
    out = fn(act, site) if _takes_site(fn) else fn(act)
    if not isinstance(out, Tensor):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise MechkitError(
            f"intervention {name} at {site} returned {type(out).__name__}, not a tensor; it must return the "
            f"edited activation of shape {tuple(act.shape)} (did it modify in place and return None?)"
        )
    return out


def _takes_site(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` requires a second positional argument (``fn(act, site)``)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # builtins without signatures take the tensor only
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def _vector(value: Any) -> Tensor:
    """A tensor, or the ``directions`` / ``direction`` a fitted artifact exposes."""
    if isinstance(value, Tensor):
        return value
    for name in ("directions", "direction"):
        inner = getattr(value, name, None)
        if isinstance(inner, Tensor):
            return inner
    raise MechkitError(f"expected a tensor or an artifact with .directions, got {type(value).__name__}")


__all__ = [
    "Add",
    "Apply",
    "Intervention",
    "Mean",
    "ProjectOut",
    "Replace",
    "Resample",
    "RunContext",
    "Scale",
    "Zero",
    "call_plain",
    "selection_mask",
]
