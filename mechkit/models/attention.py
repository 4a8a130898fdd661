"""An eager-equivalent attention function under which ``attn.pattern`` can be read and replaced.

HF attention modules return their weights only after multiplying them with v, so a hook on the
module can read the pattern but not change what it did. transformers dispatches attention through
a registry of functions named by ``config._attn_implementation``; mechkit registers one more,
``"mechkit_eager"``, and switches an eager model to it only for the duration of one forward pass
(:func:`editable_patterns`), restoring ``"eager"`` afterwards, exceptions included.

The function calls the module's own eager function (the one its forward falls back to), so the
pattern and, when nothing is replaced, the output are exactly what eager attention computes. A
per-forward context variable maps attention modules to edits; a replaced pattern is multiplied
with v here (keys/values repeated per query head under GQA), before the output projection. While
the switch lasts, other code running the same model (another thread) gets this function without
edits, i.e. exactly eager attention.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import SiteNotSupportedError

NAME = "mechkit_eager"
Edit = Callable[[Tensor], Tensor]


@dataclass
class AttentionEdits:
    """What one attention module's call does to its inputs and pattern (each returns its argument
    itself when it only reads). ``query`` / ``key`` see ``[batch, pos, head, d_head]`` (after
    rotary), ``pattern`` sees ``[batch, head, query, key]``."""

    query: Edit | None = None
    key: Edit | None = None
    pattern: Edit | None = None

    def put(self, side: str, fn: Edit) -> None:
        """Set the edit of a tap side (``"rot_q"``, ``"rot_k"`` or ``"pattern"``)."""
        setattr(self, {"rot_q": "query", "rot_k": "key", "pattern": "pattern"}[side], fn)


_EDITS: ContextVar[Mapping[nn.Module, AttentionEdits] | None] = ContextVar("mechkit_attention_edits", default=None)


def _eager_of(module_type: type) -> Callable | None:
    """The ``eager_attention_forward`` the module's forward would use under eager attention (looked
    up on every call, so a patched modeling module is honoured as eager attention would honour it)."""
    forward = inspect.unwrap(module_type.forward)
    return getattr(forward, "__globals__", {}).get("eager_attention_forward")


def has_eager_function(module: nn.Module) -> bool:
    return _eager_of(type(module)) is not None


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs):
    """Eager attention, with this forward pass's edits (if any) applied to the queries and keys
    before the scores and to the pattern before v."""
    edit = (_EDITS.get() or {}).get(module)
    if edit is not None:
        query, key = _heads_edit(edit.query, query), _heads_edit(edit.key, key)
    out, pattern = _eager_of(type(module))(module, query, key, value, attention_mask, **kwargs)
    if edit is None or edit.pattern is None:
        return out, pattern
    new = edit.pattern(pattern)
    if new is pattern:  # read (or routed for gradients) only: eager's own output stands
        return out, pattern
    groups = new.shape[1] // value.shape[1]
    values = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    return torch.matmul(new.to(values.dtype), values).transpose(1, 2).contiguous(), new


def _heads_edit(fn: Edit | None, x: Tensor) -> Tensor:
    """Apply ``fn`` in the site layout ``[batch, pos, head, d_head]`` (HF passes ``[batch, head, pos, d]``)."""
    if fn is None:
        return x
    return fn(x.transpose(1, 2)).transpose(1, 2)  # a read stays on the path, so gradients reach it


@functools.cache
def _register() -> None:
    """Add ``NAME`` to transformers' attention and mask registries (once, when a model first needs it).

    Harmless: it only adds a new key; no model uses it unless its config names it, and mechkit
    names it only inside its own forward passes. Masks are built exactly as for eager attention.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _eager_configs(model: nn.Module) -> list[Any]:
    """The distinct HF configs in ``model`` currently set to eager attention."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "eager":
            configs[id(config)] = config
    return list(configs.values())


def is_eager(model: nn.Module) -> bool:
    return bool(_eager_configs(model))


@contextlib.contextmanager
def editable_patterns(model: nn.Module, edits: Mapping[nn.Module, AttentionEdits]) -> Iterator[None]:
    """Run ``model`` (eager) through mechkit's attention function with ``edits`` for one forward pass."""
    configs = _eager_configs(model)
    if not configs:
        raise SiteNotSupportedError(
            "attn.pattern needs eager attention, and this model no longer uses it; call "
            "model.set_attn_implementation('eager')"
        )
    _register()
    token = _EDITS.set(edits)
    # the internal attribute, not the property: the property would also rewrite sub-configs
    for config in configs:
        config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation_internal = "eager"
        _EDITS.reset(token)
