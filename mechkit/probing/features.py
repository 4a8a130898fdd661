"""Probe features ``[sites, prompts, d]`` from a model, an ActivationStore or tensors at hand.

``position`` picks one vector per prompt among its real tokens: ``"last"`` (the last real token),
``"mean"`` (the mean over real tokens — padding never enters it) or an int counted among real tokens
(negative from the end). A model runs in batches of ``batch_size`` prompts; a store must hold the
dataset's prompts in order (collected with ``positions="last"`` or ``"real"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.selection import RunContext, position_mask
from mechkit.sites import Site

Position = str | int


def check_position(position: Position) -> Position:
    if isinstance(position, bool) or not (position in ("last", "mean") or isinstance(position, int)):
        raise MechkitError(f"position={position!r}: use 'last', 'mean' or an int counted among real tokens")
    return position


def pool(act: Tensor, mask: Tensor, position: Position) -> Tensor:
    """One vector per row of ``act [batch, seq, d]`` given the real-token ``mask [batch, seq]``."""
    if position == "mean":
        m = mask.to(act.dtype)[..., None]
        return (act * m).sum(1) / m.sum(1).clamp_min(1)
    picked = position_mask("last" if position == "last" else position, RunContext(mask.long()))
    return act[picked].view(act.shape[0], act.shape[-1])


def from_model(model: Any, prompts: Sequence[str], sites: Any, position: Position, *,
               batch_size: int = 32, progress: bool = True) -> tuple[list[Site], Tensor]:
    """Run ``model`` over ``prompts`` and pool every site: ``(sites, features [S, n, d])``."""
    from tqdm.auto import tqdm

    resolved = model.resolve(sites)
    if not resolved:
        raise MechkitError(f"{sites!r} names no site of this model")
    chunks: list[list[Tensor]] = [[] for _ in resolved]
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="probe features", disable=not progress, leave=False):
        _, cache = model.run_with_cache(list(prompts[start:start + batch_size]), resolved)
        mask = cache.attention_mask.bool()
        for i, site in enumerate(resolved):
            act = cache[site]
            if act.ndim != 3:
                raise MechkitError(f"{site} has shape {tuple(act.shape)}; a probe reads [batch, pos, d] sites "
                                   "(give a head-narrowed site such as blocks.3.attn.z.h2, or a residual site)")
            chunks[i].append(pool(act.float(), mask, position))
    return resolved, torch.stack([torch.cat(c) for c in chunks])


def from_store(store: Any, n_prompts: int, sites: Any, position: Position) -> tuple[list[Site], Tensor]:
    """Pool the rows of an ActivationStore per prompt: ``(sites, features [S, n, d])``."""
    names = _store_sites(store, sites)
    prompt = store.prompt_indices.load().long()
    pos = store.positions.load().long()
    if prompt.numel() == 0 or int(prompt.max()) + 1 != n_prompts or torch.unique(prompt).numel() != n_prompts:
        raise MechkitError(f"the store holds rows of {torch.unique(prompt).numel()} prompts but the dataset has "
                           f"{n_prompts}; collect the dataset's prompts, in order, into the store")
    rows = _store_rows(prompt, pos, n_prompts, position)
    feats = []
    for site in names:
        column = store[site].load().float()
        if position == "mean":
            total = torch.zeros(n_prompts, column.shape[-1]).index_add_(0, prompt, column)
            feats.append(total / torch.bincount(prompt, minlength=n_prompts)[:, None])
        else:
            feats.append(column[rows])
    return [Site.parse(s) for s in names], torch.stack(feats)


def _store_sites(store: Any, sites: Any) -> list[str]:
    available = [str(s) for s in store.sites]
    if isinstance(sites, str) and "*" in sites:
        import fnmatch

        picked = [s for s in available if fnmatch.fnmatchcase(s, sites)]
        if not picked:
            raise MechkitError(f"{sites!r} matches no site of the store; it holds {available}")
        return picked
    names = [sites] if isinstance(sites, (str, Site)) else list(sites)
    for s in names:
        store[s]
    return [str(Site.parse(s)) for s in names]


def _store_rows(prompt: Tensor, pos: Tensor, n: int, position: Position) -> Tensor:
    """Row index per prompt for ``last`` or an int among the stored positions of that prompt."""
    if position == "mean":
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(prompt * (pos.max() + 1) + pos)  # rows grouped by prompt, positions ascending
    counts = torch.bincount(prompt, minlength=n)
    first = torch.cumsum(counts, 0) - counts
    if position == "last":
        offset = counts - 1
    else:
        offset = torch.full_like(counts, position) if position >= 0 else counts + position
        if bool(((offset < 0) | (offset >= counts)).any()):
            raise MechkitError(f"position {position} is not stored for every prompt; collect with "
                               "positions='real' (or probe position='last')")
    return order[first + offset]


def from_tensors(features: Tensor | Mapping[str, Tensor]) -> tuple[list[str], Tensor]:
    """Features given directly: ``[S, n, d]`` / ``[n, d]`` tensors or a ``{site: [n, d]}`` mapping."""
    if isinstance(features, Mapping):
        names = [str(k) for k in features]
        values = list(features.values())
        widths = {tuple(v.shape) for v in values}
        if len(widths) != 1:
            raise MechkitError(f"all sites must have the same [n, d] shape to sweep together, got {sorted(widths)}")
        return names, torch.stack([v.float() for v in values])
    x = features if features.ndim == 3 else features[None]
    if x.ndim != 3:
        raise MechkitError(f"features must be [sites, n, d] or [n, d], got {tuple(features.shape)}")
    return [f"layer {i}" for i in range(x.shape[0])], x.float()


def sequences(model: Any, prompts: Sequence[str], site: Any, *, batch_size: int = 32,
              progress: bool = True) -> tuple[Tensor, Tensor]:
    """Every token's vector at one site, for attentive probes: ``(x [n, T, d], mask [n, T])``, right-padded
    to the longest prompt (``mask`` is True at real tokens; padding rows are zeros)."""
    from tqdm.auto import tqdm

    resolved = model.resolve(site)
    if len(resolved) != 1:
        raise MechkitError(f"attentive probes read one site; {site!r} names {len(resolved)}")
    chunks, masks = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="token features", disable=not progress, leave=False):
        _, cache = model.run_with_cache(list(prompts[start:start + batch_size]), resolved)
        mask = cache.attention_mask.bool()
        chunks.append(cache[resolved[0]].float() * mask[..., None])
        masks.append(mask)
    width = max(c.shape[1] for c in chunks)
    x = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    return x, mask
