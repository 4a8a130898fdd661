"""Per-head copies of a q/k/v projection's input (sites ``attn.q_in`` / ``k_in`` / ``v_in``).

A projection ``x -> x @ W + b`` computes every head's query (or key, value) from one shared input.
The per-head site gives each head its own copy of that input, ``[..., head, d_model]``; whenever a
copy is edited or differentiated, the heads' outputs are recomputed from their own copies, so an
edit to head h reaches only head h and each head's copy has its own gradient. The copies are the
projection's input, i.e. *after* the attention norm in pre-LN blocks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mechkit.models.taps import RunShape, Tap


def output_tap(tap: Tap) -> Tap:
    """The projection's per-head output, laid out by the head-input tap's transform."""
    return replace(tap, side="output")


def linear_map(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W [d_in, d_out], b)`` with ``module(x) == x @ W + b``, for nn.Linear and HF's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight.T, module.bias
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight, module.bias  # GPT-2's Conv1D stores the weight as [d_in, d_out]
    raise TypeError(f"{type(module).__name__} is not a plain linear projection")


def head_copies(x: Tensor, n_heads: int) -> Tensor:
    """``[..., d] -> [..., n_heads, d]``: one (view) copy of the input per head."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n_heads, x.shape[-1])


def n_heads_of(tap: Tap, shape: RunShape) -> int:
    return shape.n_kv_heads if tap.transform == "kv_heads" else shape.n_heads


def project_heads(module: nn.Module, tap: Tap, copies: Tensor, shape: RunShape) -> Tensor:
    """Each head's projection output computed from its own input copy: ``[..., head, d_head]``."""
    from mechkit.models.taps import get

    _, bias = linear_map(module)
    heads = project_change(module, tap, copies, shape)
    return heads if bias is None else heads + get(output_tap(tap), bias, shape)


def project_change(module: nn.Module, tap: Tap, change: Tensor, shape: RunShape) -> Tensor:
    """``change @ W`` per head (no bias): how each head's output moves when its input copy moves by
    ``change``. Adding it to the module's own output leaves an unedited head bit for bit unchanged."""
    from mechkit.models.taps import get

    weight, _ = linear_map(module)
    w_heads = get(output_tap(tap), weight, shape)  # [d_in, head, d_head]: the transform applied to W's columns
    return torch.einsum("...hi,ihd->...hd", change.to(weight.dtype), w_heads)
