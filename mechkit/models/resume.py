"""Resumed and last-token runs: the checks and helpers behind ``run_with_interventions(start=...,
logits_at="last")``, which let sweeps pay only for the layers and positions they change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.models.inputs import Batch
from mechkit.models.prefix import PrefixCache
from mechkit.selection import RunContext
from mechkit.sites import Site


def kept_positions(model: Any, logits_at: str | None, batch: Batch, touched: Sequence[Site]) -> Tensor | None:
    """The positions whose logits a ``logits_at="last"`` run computes (None: all of them)."""
    if logits_at is None:
        return None
    if logits_at != "last":
        raise MechkitError(f"logits_at must be 'last' or None, not {logits_at!r}")
    if model.info.encoder:
        raise MechkitError("logits_at='last' is for causal LMs; an encoder's output is read at every position")
    if any(s.kind == "logits" for s in [*touched, *model.edited_sites]):
        raise MechkitError("a run with logits_at='last' cannot read or write the logits site; "
                           "leave logits_at unset")
    return RunContext(batch.attention_mask).last_positions.unique()


def start_site(model: Any, start: tuple[str | Site, Tensor], batch: Batch,
               touched: Sequence[Site]) -> tuple[Site, Tensor]:
    """Check a ``start=(site, value)`` pair against the run it resumes."""
    if not (isinstance(start, tuple) and len(start) == 2 and isinstance(start[1], Tensor)):
        raise TypeError("start must be a pair (site, tensor), "
                        "e.g. ('blocks.4.resid_pre', cache['blocks.4.resid_pre'])")
    sites = model.resolve(start[0])
    if len(sites) != 1 or sites[0].kind != "resid_pre" or sites[0] != sites[0].base or sites[0].splice:
        raise MechkitError(f"a run can start only at one blocks.L.resid_pre site, not {start[0]!r}")
    site, value = sites[0], start[1]
    touched = [*touched, *model.edited_sites]
    expected = (*batch.shape, model.info.d_model)
    if tuple(value.shape) != expected:
        raise MechkitError(f"the start value for {site} has shape {tuple(value.shape)}; this run needs "
                           f"{expected} (batch, positions, d_model) — take it from a run of the same inputs")
    below = [s for s in touched if (s.layer is not None and s.layer < site.layer) or s.kind == "embed"]
    if below:
        raise MechkitError(f"{below[0]} lies below {site}, where this run starts, so it is never computed; "
                           "start lower or drop that site")
    return site, value


def check_prefix(model: Any, prefix: Any, batch: Batch, read: Sequence[Site], writes: Mapping[Site, Any]) -> None:
    """Check a ``prefix=n`` (or ``PrefixCache``) promise against the run it speeds up."""
    if isinstance(prefix, PrefixCache):
        prefix = prefix.n
    elif isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise MechkitError(f"prefix must be a number of positions >= 0 or a model.prefix_cache(...), not {prefix!r}")
    if not prefix:
        return
    if model.info.encoder:
        raise MechkitError("prefix= is for causal LMs: an encoder's every position sees the later ones")
    shortest = int(batch.attention_mask.sum(-1).min())
    if prefix >= shortest:
        raise MechkitError(f"prefix={prefix} leaves no position to compute in a row of {shortest} real tokens; "
                           "it must be below every row's length")
    if read:
        raise MechkitError("a run with prefix= records no sites (its first positions are not computed); "
                           "leave cache unset")
    if model.edited_sites:
        raise MechkitError("prefix= reuses the unedited run's first positions, but intervene / splice contexts "
                           f"edit {model.edited_sites[0]}; run without prefix inside them")
    bad = [s for s in writes if "pos" not in s.axes or "key_pos" in s.axes or s.kind == "attn.rot_k"]
    if bad:
        raise MechkitError(f"prefix= cannot apply the write at {bad[0]} (axes {bad[0].axes}): it spans the reused "
                           "positions; only sites with one position axis can be edited on the later positions alone")


def at_positions(logits: Tensor, kept: Tensor, batch: Batch) -> Tensor:
    """Full-width logits holding each row's last-token logits and NaN elsewhere, from logits computed
    at every position or only at the ``kept`` ones."""
    rows, last = torch.arange(logits.shape[0]), RunContext(batch.attention_mask).last_positions.to(logits.device)
    column = torch.searchsorted(kept.to(logits.device), last) if logits.shape[1] == kept.numel() else last
    out = torch.full((*batch.shape, logits.shape[-1]), float("nan"), dtype=logits.dtype, device=logits.device)
    out[rows, last] = logits[rows, column]
    return out


class Start:
    """The write that makes block L read the given residual stream (the first write at its site)."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self, act: Tensor) -> Tensor:
        return self.value.to(device=act.device, dtype=act.dtype)
