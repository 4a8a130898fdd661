"""Runs that reuse an unedited prefix: only positions ``n`` and later are computed, attending to
the keys and values of the first ``n`` positions from one plain pass over the distinct prefixes.

Behind ``run_with_interventions(prefix=n)`` on HF decoders (torch_hooks): a sweep whose edits leave
the first ``n`` positions alone — patching between prompts that agree up to position n — pays only
for the positions after them. Writes still see tensors over every position (the reused ones zero
and discarded), so run-aware selectors such as ``"last"`` count positions as in a full run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechkit.models.inputs import Batch
from mechkit.sites import Site


def prefix_reusable(module: nn.Module) -> bool:
    """Whether ``module`` takes a key/value cache in one full-attention layout (no sliding windows)."""
    config = getattr(module, "config", None)
    if config is None or "cache" not in inspect.signature(module.forward).parameters:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    return not getattr(text, "sliding_window", None) and all(t == "full_attention" for t in layer_types)


@dataclass(frozen=True, eq=False)
class Prefix:
    """The first ``n`` positions' keys and values of every layer, for each row of the batch."""

    n: int
    layers: tuple[tuple[Tensor, Tensor], ...]

    def kwargs(self, batch: Batch) -> dict:
        """Forward arguments that run the later positions of ``batch`` on this prefix (a fresh cache
        each call: a forward appends to it)."""
        from transformers import DynamicCache

        return {"input_ids": batch.input_ids[:, self.n:], "attention_mask": batch.attention_mask,
                "cache": DynamicCache([(k, v) for k, v in self.layers])}


def unedited_prefix(module: nn.Module, batch: Batch, n: int) -> Prefix:
    """Keys and values of the first ``n`` positions of ``batch``, from one pass over its distinct
    prefixes (sweeps repeat a few prompts many times)."""
    distinct, row_of = torch.unique(batch.input_ids[:, :n], dim=0, return_inverse=True)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(input_ids=distinct, attention_mask=torch.ones_like(distinct), use_cache=True)
    finally:
        module.train(was_training)
    return Prefix(n, tuple((k[row_of], v[row_of]) for k, v, *_ in out.cache))


def on_suffix(fn: Callable[[Tensor], Tensor], site: Site, n: int, width: int) -> Callable[[Tensor], Tensor]:
    """``fn`` applied to the later positions of a tensor over all ``width`` positions (zeros before
    ``n``, whatever ``fn`` writes there is dropped)."""
    dim = site.axes.index("pos")

    def write(act: Tensor) -> Tensor:
        shape = list(act.shape)
        shape[dim] = width
        full = act.new_zeros(shape)
        full.narrow(dim, n, width - n).copy_(act)
        return fn(full).narrow(dim, n, width - n)

    return write
