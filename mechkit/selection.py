"""Which entries of a site's tensor a selector picks, counted among real tokens.

Pure functions over tensors, shared by the interventions and by every analysis that picks
positions. A :class:`RunContext` describes one forward pass (which tokens are real); selectors
name positions, heads, neurons, experts or features:

- positions: ``"last"`` (each row's last real token), ``"real"`` (every real token), an int or a
  list of ints counted among each row's real tokens (negative from its last real token), a
  slice over real tokens, or a boolean ``[batch, pos]`` mask;
- any other named axis: an int, a list of ints, a slice, a boolean ``[n]`` mask, or a boolean
  ``[batch, n]`` mask that selects different entries in different rows (so one forward pass can
  hold several patched variants, one per row).

Padding is never selected: a position mask is always intersected with the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from mechkit.errors import MechkitError

Index = Union[int, str, Sequence[int], slice, Tensor, None]
POSITION_WORDS = ("last", "real")


@dataclass(frozen=True, eq=False)
class RunContext:
    """One forward pass as interventions see it: which tokens of each row are real."""

    attention_mask: Tensor  # [batch, seq], 1 for real tokens

    @classmethod
    def dense(cls, batch: int, seq: int, device: Any = None) -> RunContext:
        """A context without padding."""
        return cls(torch.ones(batch, seq, dtype=torch.long, device=device))

    @property
    def real(self) -> Tensor:
        """Boolean [batch, seq]: True at real tokens."""
        return self.attention_mask.bool()

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def lengths(self) -> Tensor:
        """Number of real tokens in each row."""
        return self.real.sum(-1)

    @property
    def real_index(self) -> Tensor:
        """[batch, seq]: each position's index among its row's real tokens (-1 at padding)."""
        real = self.real
        return torch.where(real, real.long().cumsum(-1) - 1, torch.full_like(self.attention_mask, -1))

    @property
    def last_positions(self) -> Tensor:
        """Absolute position of each row's last real token."""
        real = self.real.long()
        return (real * torch.arange(real.shape[1], device=real.device)).argmax(-1)

    @property
    def padded(self) -> bool:
        return not bool(self.real.all())


# -- positions -----------------------------------------------------------------------------------


def check_selector(name: str, index: Index) -> None:
    """Reject malformed selectors when an intervention is built, not inside the forward pass."""
    if index is None or isinstance(index, slice):
        return
    if isinstance(index, str):
        if name == "positions" and index in POSITION_WORDS:
            return
        allowed = "'last', 'real', " if name == "positions" else ""
        raise MechkitError(f"{name}={index!r}: use {allowed}an int, a list of ints, a slice or a boolean mask")
    if isinstance(index, Tensor):
        if index.dtype == torch.bool or not index.dtype.is_floating_point:
            return
        raise MechkitError(f"{name}: a tensor selector must be boolean or integer, got {index.dtype}")
    if isinstance(index, bool):
        raise MechkitError(f"{name}={index!r}: a bool is not an index; pass an int, a list or a boolean mask")
    if isinstance(index, int):
        return
    if isinstance(index, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        if len(index) == 0:
            raise MechkitError(f"{name}=[]: an empty selection would edit nothing; pass None to select all")
        return
    raise MechkitError(f"{name}={index!r}: use an int, a list of ints, a slice or a boolean mask")


def position_mask(positions: Index, ctx: RunContext) -> Tensor:
    """Boolean [batch, seq] of the selected real tokens."""
    real = ctx.real
    if positions is None or positions == "real":
        return real
    if isinstance(positions, str):  # "last"
        mask = torch.zeros_like(real)
        mask[torch.arange(ctx.batch_size), ctx.last_positions] = True
        return mask & real
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != tuple(real.shape):
            raise MechkitError(
                f"a boolean position mask must have shape [batch, pos] = {tuple(real.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        return positions.to(real.device) & real
    if isinstance(positions, slice):
        return _slice_mask(positions, ctx)
    values = [positions] if isinstance(positions, int) else [int(p) for p in positions]
    return _index_mask(values, ctx)


def _index_mask(values: list[int], ctx: RunContext) -> Tensor:
    lengths, index = ctx.lengths, ctx.real_index
    mask = torch.zeros_like(ctx.real)
    for p in values:
        target = torch.full_like(lengths, p) if p >= 0 else lengths + p
        bad = ((target < 0) | (target >= lengths)).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            raise MechkitError(
                f"position {p} does not exist in row {row}, which has {int(lengths[row])} real tokens "
                f"({len(bad)} row(s) affected); positions count real tokens, padding excluded — "
                "use 'last', a negative index, or a boolean [batch, pos] mask for rows of different lengths"
            )
        mask |= index == target[:, None]
    return mask


def _slice_mask(chosen: slice, ctx: RunContext) -> Tensor:
    mask = torch.zeros_like(ctx.real)
    index = ctx.real_index
    for row, length in enumerate(ctx.lengths.tolist()):
        keep = torch.zeros(max(length, 1), dtype=torch.bool)
        keep[list(range(length))[chosen]] = True
        mask[row] = ctx.real[row] & keep[index[row].clamp(min=0)]
    return mask


def alignment(positions: Index) -> str:
    """How positions pair up between runs of different lengths: from each row's end or its start."""
    if positions == "last":
        return "end"
    if isinstance(positions, int) and not isinstance(positions, bool):
        return "end" if positions < 0 else "start"
    negative = isinstance(positions, Sequence) and not isinstance(positions, str) and bool(positions) and all(
        isinstance(p, int) and p < 0 for p in positions
    )
    return "end" if negative else "start"


def aligned_positions(target: RunContext, source: RunContext, how: str) -> tuple[Tensor, Tensor]:
    """For every target position, the source position holding the same real token index.

    ``how="start"`` pairs the k-th real tokens, ``"end"`` pairs tokens at the same distance from
    each row's last real token. Returns ``(index [batch, seq], valid [batch, seq])``.
    """
    t_index, s_len, t_len = target.real_index, source.lengths, target.lengths
    k = t_index if how == "start" else t_index + (s_len - t_len)[:, None]
    valid = target.real & (k >= 0) & (k < s_len[:, None])
    # absolute source position of the k-th real token in each source row
    order = torch.argsort((~source.real).long(), dim=-1, stable=True)
    gathered = order.gather(-1, k.clamp(0, source.seq_len - 1))
    return torch.where(valid, gathered, torch.zeros_like(gathered)), valid


# -- any axis ------------------------------------------------------------------------------------


def selection_mask(act: Tensor, axes: Sequence[str], selectors: dict[str, Index], ctx: RunContext | None,
                   site: Any = "") -> Tensor | None:
    """Boolean mask broadcastable to ``act`` that is True where every selector holds.

    ``axes`` names the dimensions of ``act``. Positions (axis ``pos``) are always limited to real
    tokens when ``ctx`` knows the run; None means nothing needs masking.
    """
    axes = tuple(axes) if len(axes) == act.ndim else ()
    has_pos = "pos" in axes and ctx is not None and act.shape[axes.index("pos")] == ctx.seq_len
    if not selectors and not (has_pos and ctx.padded):
        return None
    mask = torch.ones((1,) * act.ndim, dtype=torch.bool, device=act.device)
    for axis, index in selectors.items():
        if axis not in axes:
            raise MechkitError(f"site {site} has axes {axes or 'unknown'}; it cannot be selected by {axis!r}")
        if axis == "pos" and not has_pos:
            raise MechkitError(f"site {site}: its pos axis does not match this run's {ctx and ctx.seq_len} tokens")
        per_row = position_mask(index, ctx) if axis == "pos" else _axis_mask(index, act, axes, axis, site)
        mask = mask & _expand(per_row, act.ndim, axes.index(axis))
    if has_pos and "pos" not in selectors:
        mask = mask & _expand(ctx.real.to(act.device), act.ndim, axes.index("pos"))
    return mask


def _axis_mask(index: Index, act: Tensor, axes: tuple[str, ...], axis: str, site: Any) -> Tensor:
    """[batch, n] (per row) or [1, n] (every row) mask over one non-position axis."""
    dim = axes.index(axis)
    size, batch = act.shape[dim], act.shape[0]
    if isinstance(index, Tensor) and index.dtype == torch.bool:
        shape = tuple(index.shape)
        if shape in ((size,), (1, size)):
            return index.reshape(1, size).to(act.device)
        if shape == (batch, size):
            return index.to(act.device)
        raise MechkitError(
            f"a boolean {axis} mask for {site} must have shape [{size}] or [batch, {axis}] = {(batch, size)}, "
            f"got {shape}"
        )
    keep = torch.zeros(size, dtype=torch.bool, device=act.device)
    if isinstance(index, slice):
        keep[index] = True
        return keep.reshape(1, size)
    values = [index] if isinstance(index, int) else [int(i) for i in index]
    bad = [i for i in values if not -size <= i < size]
    if bad:
        raise MechkitError(f"{axis} index {bad} out of range for {site}: that axis has {size} entries")
    keep[torch.tensor(values, dtype=torch.long, device=act.device)] = True
    return keep.reshape(1, size)


def _expand(per_row: Tensor, ndim: int, dim: int) -> Tensor:
    """A [batch or 1, n] mask laid out along ``dim`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[0], shape[dim] = per_row.shape[0], per_row.shape[1]
    return per_row.reshape(shape)


__all__ = [
    "Index",
    "RunContext",
    "aligned_positions",
    "alignment",
    "check_selector",
    "position_mask",
    "selection_mask",
]
