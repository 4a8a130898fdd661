"""Taps: where a site lives in a module tree, and how to read and write it there.

A :class:`Tap` names a module (path template with ``{L}`` for the layer), which side of it, which
element of a tuple output, and a transform from the raw tensor to the site's canonical shape.
Every transform has an inverse ``put`` so that interventions and gradient reads write the (edited)
site value back into the model. Architecture tables in ``models/arch/`` are plain data built from taps.

Sides:
- ``output`` / ``input``: the module's output, or its first input (a forward / pre-hook).
- ``head_input``: per-head copies of a linear projection's input; writes and gradient reads
  recompute the heads' outputs from their copies (:mod:`mechkit.models.projections`).
- ``pattern``: the attention probabilities inside the module's attention function, where they
  can be replaced before they multiply v (:mod:`mechkit.models.attention`).
- ``rot_q`` / ``rot_k``: the queries and keys that function receives (after rotary embeddings
  and any q/k norm), read and replaced before the scores are computed.

``skip`` names the site kind that carries this site's residual skip: a write adds (new − old)
there as well, so a site with no module boundary of its own (``resid_mid``: the MLP norm's input
is also the skip of the MLP add) is edited for both of its readers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from mechkit.models import projections

ATTENTION_SIDES = ("pattern", "rot_q", "rot_k")


@dataclass(frozen=True)
class Tap:
    module: str
    side: Literal["output", "input", "head_input", "pattern", "rot_q", "rot_k"] = "output"
    item: int | None = None
    transform: str = "identity"
    chunk: int = 0  # which chunk of a fused projection (q=0, k=1, v=2)
    writable: bool = True
    readonly_reason: str = ""  # why writable is False (shown in SiteNotSupportedError)
    skip: str | None = None  # site kind whose value also receives this site's write (new − old)

    def path(self, layer: int | None) -> str:
        return self.module.replace("{L}", str(layer)) if layer is not None else self.module

    @property
    def hook_side(self) -> str:
        """Which hook serves the tap: head inputs are handled once the projection's output exists."""
        return "output" if self.side == "head_input" else self.side

    @property
    def in_attention(self) -> bool:
        """Served inside mechkit's attention function rather than by a module hook."""
        return self.side in ATTENTION_SIDES


@dataclass(frozen=True)
class RunShape:
    """Dimensions a transform needs: model dims plus this run's batch and sequence length."""

    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    top_k: int | None = None
    n_experts: int | None = None


@dataclass
class RunState:
    """What the hooks of one forward pass share."""

    shape: RunShape
    grad: bool
    store: dict = field(default_factory=dict)
    by_name: bool = False  # key the store by site name (nnsight ships plain strings)
    pending: dict = field(default_factory=dict)  # site -> (new − old) awaiting its skip site


# (site, tap, rewrite or None, whether the site is read)
Entry = tuple[Any, Tap, "Callable[[Tensor], Tensor] | None", bool]


# -- raw value <-> tensor at the tapped element -----------------------------------------------


def pick(raw: Any, item: int | None) -> Tensor:
    """The tensor at ``item`` of a module's output (or the output itself)."""
    if item is None:
        return raw[0] if isinstance(raw, tuple) else raw
    if not isinstance(raw, (tuple, list)):
        raise TypeError(f"expected a tuple output with element {item}, got {type(raw).__name__}")
    return raw[item]


def replace_item(raw: Any, item: int | None, value: Any) -> Any:
    if item is None:
        return (value, *raw[1:]) if isinstance(raw, tuple) else value
    return (*raw[:item], value, *raw[item + 1 :])


# -- transforms ---------------------------------------------------------------------------------


def get(tap: Tap, raw: Any, shape: RunShape) -> Tensor:
    """Canonical site tensor from the raw module value."""
    t = tap.transform
    if t == "topk_dense":
        return _topk_dense(raw, shape)
    x = pick(raw, tap.item)
    if t in ("identity", "skip_add"):
        return x
    if t == "copy":  # this module's own autograd node: edits and gradients cover only its use
        return x.view_as(x)
    if t == "head_copies":  # one copy per head of a shared input: the site is one copy
        return x.select(-2, 0)
    if t == "heads":
        return x.unflatten(-1, (shape.n_heads, shape.d_head))
    if t == "kv_heads":
        return x.unflatten(-1, (shape.n_kv_heads, shape.d_head))
    if t == "split_heads":  # fused [q | k | v] along the last axis (GPT-2 c_attn)
        return x.chunk(3, dim=-1)[tap.chunk].unflatten(-1, (shape.n_heads, shape.d_head))
    if t == "neox_qkv":  # per-head interleaved [h0: q k v, h1: q k v, ...] (GPT-NeoX)
        per_head = x.unflatten(-1, (shape.n_heads, 3 * shape.d_head))
        return per_head.chunk(3, dim=-1)[tap.chunk]
    if t == "tokens":  # routers see flattened tokens
        return x.reshape(shape.batch, shape.seq, x.shape[-1])
    raise ValueError(f"unknown tap transform {t!r}")


def put(tap: Tap, raw: Any, value: Tensor, shape: RunShape) -> Any:
    """The raw module value with the site tensor replaced by ``value`` (out of place)."""
    t = tap.transform
    if t == "topk_dense":
        return _topk_from_dense(raw, value, shape)
    x = pick(raw, tap.item)
    if t in ("identity", "copy", "skip_add"):
        new = value
    elif t in ("heads", "kv_heads"):
        new = value.flatten(-2)
    elif t == "head_copies":  # every head's copy receives the value, so its gradient sums the heads
        new = value.unsqueeze(-2).expand_as(x)
    elif t == "split_heads":
        parts = list(x.chunk(3, dim=-1))
        parts[tap.chunk] = value.flatten(-2)
        new = torch.cat(parts, dim=-1)
    elif t == "neox_qkv":
        parts = list(x.unflatten(-1, (shape.n_heads, 3 * shape.d_head)).chunk(3, dim=-1))
        parts[tap.chunk] = value
        new = torch.cat(parts, dim=-1).flatten(-2)
    elif t == "tokens":
        new = value.reshape(-1, value.shape[-1])
    else:
        raise ValueError(f"unknown tap transform {t!r}")
    return replace_item(raw, tap.item, new.to(x.dtype).contiguous())


def _topk_dense(raw: tuple, shape: RunShape) -> Tensor:
    """Router output ``(logits, weights, indices)`` as dense per-expert weights [b, s, E].

    Read from the router's own choices, never recomputed from logits (routers with biases or
    group limits choose differently from a plain top-k of their logits).
    """
    logits, weights, index = raw[0], raw[1], raw[2]
    dense = torch.zeros(index.shape[0], logits.shape[-1], dtype=weights.dtype, device=weights.device)
    dense = dense.scatter(-1, index, weights)
    return dense.reshape(shape.batch, shape.seq, -1)


def _topk_from_dense(raw: tuple, dense: Tensor, shape: RunShape) -> tuple:
    """Write edited dense weights back as (weights, indices); rows left unchanged keep their choice."""
    logits, weights, index = raw[0], raw[1], raw[2]
    dense = dense.reshape(-1, dense.shape[-1]).to(weights.dtype)
    k = index.shape[-1]
    new_weights, new_index = dense.topk(k, dim=-1)
    changed = (dense != _topk_dense(raw, shape).reshape(dense.shape)).any(-1, keepdim=True)
    # Unchanged rows keep their choice; their weights are read from ``dense`` so gradients flow.
    weights = torch.where(changed, new_weights, dense.gather(-1, index))
    index = torch.where(changed, new_index, index)
    return (logits, weights, index, *raw[3:])


def group_entries(
    sites: list, write: dict, read: set, locate: Callable[[Any], tuple[str, Tap]]
) -> dict[tuple[str, str], list[Entry]]:
    """Entries per ``(module path, hook side)``, each group in execution order of its sites.

    ``locate(site) -> (path, tap)``. A written site with a ``skip`` also gets a ``skip_add`` entry
    on its skip site's module, placed before that site's own entries (block order puts it first).
    """
    groups: dict[tuple[str, str], list[Entry]] = {}
    for site in sorted(sites, key=lambda s: s.sort_key()):
        path, tap = locate(site)
        groups.setdefault((path, tap.hook_side), []).append((site, tap, write.get(site), site in read))
        if tap.skip and site in write:
            skip_path, skip_tap = locate(type(site)(tap.skip, site.layer))
            fix = replace(skip_tap, transform="skip_add", skip=None)
            groups.setdefault((skip_path, fix.hook_side), []).append((site, fix, None, False))
    return groups


def apply_entries(entries: list[Entry], raw: Any, state: RunState, module: Any = None, module_input: Any = None):
    """The per-site steps every hook-based backend runs on one module value, in order.

    Read the site, rewrite it, route the forward through it when gradients are wanted, and store
    it. Head-input entries also need the projection ``module`` and its input tensor. Returns
    ``(raw, changed)``.
    """
    changed = False
    for site, tap, write_fn, wanted in entries:
        if tap.transform == "skip_add":
            if site in state.pending:
                raw = put(tap, raw, get(tap, raw, state.shape) + state.pending.pop(site), state.shape)
                changed = True
            continue
        if tap.side == "head_input":
            raw, did = _head_input(site, tap, write_fn, wanted, raw, state, module, module_input)
            changed |= did
            continue
        value = get(tap, raw, state.shape)
        if write_fn is not None:
            new = write_fn(value)
            if tap.skip:
                state.pending[site] = new - value
            value = new
            raw, changed = put(tap, raw, value, state.shape), True
        elif state.grad and wanted:
            # route the forward through this exact tensor so d(metric)/d(value) exists
            raw, changed = put(tap, raw, value, state.shape), True
        if wanted:
            _keep(state, site, value)
    return raw, changed


def _head_input(site, tap: Tap, write_fn, wanted: bool, raw: Any, state: RunState, module: Any, x: Tensor):
    """One head-input entry on a projection's output: per-head copies of ``x``, outputs recomputed."""
    original = projections.head_copies(x, projections.n_heads_of(tap, state.shape))
    value = original
    changed = write_fn is not None or (state.grad and wanted)
    if write_fn is not None:
        value = write_fn(value)
    if changed:
        # the module's output plus each copy's change: exact for unedited heads, and the gradient at
        # a copy flows through its own head only (the module's own path is detached)
        base = get(projections.output_tap(tap), raw, state.shape).detach()
        heads = base + projections.project_change(module, tap, value - original.detach(), state.shape)
        raw = put(projections.output_tap(tap), raw, heads, state.shape)
    if wanted:
        _keep(state, site, value)
    return raw, changed


def _keep(state: RunState, site: Any, value: Tensor) -> None:
    state.store[str(site) if state.by_name else site] = value if state.grad else value.detach()
