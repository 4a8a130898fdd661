"""One forward pass's edits: interventions and splices turned into per-site write functions.

Backends only know ``{site: fn(tensor) -> tensor}``. This module builds those functions from
the interventions (already grouped by site) and the active splices, binds them to the run's
:class:`~mechkit.selection.RunContext`, checks every value they produce (shape, NaN/inf), and
records which writes fired, so a write at a site the forward pass never reached is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.interventions import Intervention, call_plain
from mechkit.models.cache import narrow, widen
from mechkit.models.splice import Splice, run_splice
from mechkit.selection import RunContext
from mechkit.sites import Site

WriteFn = Callable[[Tensor], Tensor]
Items = list[tuple[Site, Any]]  # (site as addressed, intervention)


class RunEdits:
    """The write functions of one run, plus what they saw (fired sites, splice-part values)."""

    def __init__(self, writes: dict[Site, Items], splices: Sequence[Splice], part_reads: Sequence[Site],
                 ctx: RunContext, grad: bool) -> None:
        self.ctx, self.grad = ctx, grad
        self.part_writes = {s: items for s, items in writes.items() if s.splice is not None}
        self.part_reads = set(part_reads)
        self.parts: dict[Site, Tensor] = {}
        self.fired: set[Site] = set()
        host_items = {s: items for s, items in writes.items() if s.splice is None}
        by_host: dict[Site, list[Splice]] = {}
        for splice in splices:
            by_host.setdefault(splice.host, []).append(splice)
        self.write_fns: dict[Site, WriteFn] = {
            host: self._host_fn(host, host_items.get(host, []), by_host.get(host, []))
            for host in dict.fromkeys([*host_items, *by_host])
        }

    def _host_fn(self, host: Site, items: Items, splices: list[Splice]) -> WriteFn:
        def write(act: Tensor) -> Tensor:
            self.fired.add(host)
            for site, iv in items:
                act = apply_one(site, iv, act, self.ctx)
            for splice in splices:
                act = run_splice(splice, act, self._tap(splice))
            return act

        return write

    def _tap(self, splice: Splice) -> Callable[[str, Tensor], Tensor]:
        def tap(part: str, value: Tensor) -> Tensor:
            site = splice.site(part)
            if site in self.part_writes:
                self.fired.add(site)
                for target, iv in self.part_writes[site]:
                    value = apply_one(target, iv, value, self.ctx)
            if site in self.part_reads:
                self.parts[site] = value if self.grad else value.detach()
            return value

        return tap

    def not_fired(self) -> list[Site]:
        """Written sites the forward pass never reached."""
        return [s for s in [*self.write_fns, *self.part_writes] if s not in self.fired]


def apply_one(site: Site, iv: Any, act: Tensor, ctx: RunContext) -> Tensor:
    """Apply one intervention at ``site`` (narrowed to a head / expert if the site names one)."""
    narrowed = site.head is not None or site.expert is not None
    target = narrow(act, site) if narrowed else act
    new = iv(target, site, ctx) if isinstance(iv, Intervention) else call_plain(iv, target, site)
    if new.shape != target.shape:
        raise MechkitError(
            f"intervention {_name(iv)} at {site} returned shape {tuple(new.shape)}; the site has "
            f"{tuple(target.shape)} (axes {site.axes}) — return a tensor of the same shape"
        )
    if new.is_floating_point() and not bool(torch.isfinite(new).all()):
        introduced = ~torch.isfinite(new) & torch.isfinite(target)
        if bool(introduced.any()):
            raise MechkitError(
                f"intervention {_name(iv)} at {site} produced {int(introduced.sum())} NaN/inf values; "
                "check its inputs (e.g. a division by a zero norm, or a source run with fewer tokens)"
            )
    new = new.to(target.dtype)
    return widen(act, site, new) if narrowed else new


def _name(iv: Any) -> str:
    return type(iv).__name__ if isinstance(iv, Intervention) else getattr(iv, "__name__", type(iv).__name__)


__all__ = ["RunEdits", "WriteFn", "apply_one"]


@contextlib.contextmanager
def skipped(blocks: Sequence[Any]) -> Iterator[None]:
    """Inside the block, each of ``blocks`` returns its input unchanged instead of computing (an
    instance ``forward`` shadows the class's; removed on exit, always). Used to resume a forward
    from a known residual stream: every HF decoder block and HookedTransformer block maps the
    residual stream (its first argument) to the residual stream."""
    try:
        for block in blocks:
            block.forward = _pass_through
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _pass_through(*args: Any, **kwargs: Any) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]
