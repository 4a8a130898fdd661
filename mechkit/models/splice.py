"""Splice points: a module inserted at a site, whose intermediates become sites of their own.

``model.splice("blocks.3.resid_post", sae)`` runs ``sae`` on that site's value during every
forward pass inside the block and continues the model with its output. The module's
intermediates are sites named ``<host>.<name>.<part>`` that caches, interventions and gradients
accept like any other. Three kinds of module plug in without adapters:

- an SAE / transcoder-like object with ``encode`` and ``decode``: parts ``in``, ``latents``,
  ``recon``, ``error`` (= in − decode(encode(in)), computed from the unedited latents) and ``out``
  (= recon + error, so splicing alone changes nothing; ``keep_error=False`` continues with recon);
- any callable ``tensor → tensor`` (a fitted eraser, an ``nn.Module``): parts ``in`` and ``out``;
- an object with ``splice_forward(x, tap)`` and ``splice_parts`` (names): it calls
  ``tap(part, tensor)`` for each intermediate and uses the tensor ``tap`` returns (edited when an
  intervention targets that part).

The error term is its own node: gradients at ``latents`` flow through the decoder only, and the
gradient at ``in`` equals the gradient at the host site (the splice is the identity on ``in``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.interventions import call_plain
from mechkit.sites import Site

Tap = Callable[[str, Tensor], Tensor]
SAE_PARTS = ("in", "latents", "recon", "error", "out")


@dataclass(frozen=True, eq=False)
class Splice:
    """One module spliced in at ``host`` under ``name``."""

    host: Site
    name: str
    module: Any
    keep_error: bool = True

    @property
    def parts(self) -> tuple[str, ...]:
        return splice_parts(self.module)

    def site(self, part: str) -> Site:
        return Site(self.host.kind, self.host.layer, splice=f"{self.name}.{part}")

    @property
    def sites(self) -> list[Site]:
        return [self.site(p) for p in self.parts]


def is_sae_like(module: Any) -> bool:
    return callable(getattr(module, "encode", None)) and callable(getattr(module, "decode", None))


def splice_parts(module: Any) -> tuple[str, ...]:
    """The part names a module exposes when spliced."""
    if hasattr(module, "splice_forward"):
        parts = getattr(module, "splice_parts", None)
        if not parts or not all(isinstance(p, str) for p in parts):
            raise MechkitError(
                f"{type(module).__name__} defines splice_forward but no splice_parts; list the names it taps"
            )
        return ("in", *parts, "out")
    if is_sae_like(module):
        return SAE_PARTS
    if callable(module):
        return ("in", "out")
    raise MechkitError(
        f"cannot splice a {type(module).__name__}: pass a callable tensor → tensor, an object with "
        "encode/decode (an SAE), or one with splice_forward(x, tap)"
    )


def run_splice(splice: Splice, x: Tensor, tap: Tap) -> Tensor:
    """The spliced module's output for the host value ``x``, tapping every part on the way."""
    module = splice.module
    x = tap("in", x)
    if hasattr(module, "splice_forward"):
        y = module.splice_forward(x, tap)
    elif is_sae_like(module):
        latents_raw = module.encode(x)
        error = tap("error", x - module.decode(latents_raw))
        # a distinct node: gradients at the latents reach the decoder, not the error term
        latents = tap("latents", latents_raw.clone())
        recon = tap("recon", module.decode(latents))
        y = recon + error if splice.keep_error else recon
    else:
        y = call_plain(module, x, splice.host)
    y = tap("out", y)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise MechkitError(
            f"the module spliced at {splice.host} as {splice.name!r} returned {got}; it must return the "
            f"site's shape {tuple(x.shape)} so the model can continue"
        )
    return y


__all__ = ["SAE_PARTS", "Splice", "is_sae_like", "run_splice", "splice_parts"]
