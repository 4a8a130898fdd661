"""Activations to train on, taken from a wrapped model and prompts: the rows of real tokens at one site.

With a folder they are collected once through :func:`mechkit.activations.collect.collect` into an
:class:`~mechkit.activations.store.ActivationStore` (which a rerun reuses without running the model);
without one they are gathered in memory, batch by batch, through ``run_with_cache``. Either way only
real tokens are kept: padding never becomes a training row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechkit.activations.collect import collect, select_positions
from mechkit.errors import MechkitError

__all__ = ["is_model", "model_activations", "one_site"]


def model_activations(model: Any, prompts: Sequence[Any], site: str, *, batch_size: int = 8,
                      store_dir: str | Path | None = None, progress: bool = False) -> Any:
    """Rows ``[real tokens, d]`` of ``site`` over ``prompts`` (texts or token-id lists), in prompt order
    and position order; an ActivationStore in ``store_dir`` when given, else a float32 tensor."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise MechkitError("prompts must be a non-empty list of texts or token-id lists (wrap a single text in a "
                           "list)")
    if store_dir is not None:
        return collect(model, prompts, [site], store_dir, batch_size=batch_size, progress=progress)
    chosen = one_site(model, site)
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = model.to_tokens(list(prompts[start:start + batch_size]))
        _, cache = model.run_with_cache(batch, [chosen])
        act = cache[chosen]
        if act.ndim < 3 or tuple(act.shape[:2]) != tuple(batch.input_ids.shape):
            raise MechkitError(f"{chosen} has shape {tuple(act.shape)}, not [batch, pos, ...]: an SAE trains on "
                               "one vector per token, so pick a per-token site such as blocks.0.resid_post")
        b, t = select_positions(batch, "all")  # real tokens only
        rows.append(act[b, t].reshape(len(b), -1).to(torch.float32))
    return torch.cat(rows)


def one_site(model: Any, site: str) -> Any:
    """The single site ``site`` names in ``model`` (an SAE works at exactly one)."""
    resolved = model.resolve(site)
    if len(resolved) != 1:
        raise MechkitError(f"{site!r} names {len(resolved)} sites; an SAE works at exactly one")
    return resolved[0]


def is_model(source: Any) -> bool:
    from mechkit.models.base import Model

    return isinstance(source, Model)
