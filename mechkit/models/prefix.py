"""Runs that reuse an unedited prefix: only positions ``n`` and later are computed, attending to
the keys and values of the first ``n`` positions from one plain pass over the distinct prefixes.

Behind ``run_with_interventions(prefix=...)`` on HF decoders (torch_hooks): a sweep whose edits
leave the first ``n`` positions alone — patching between prompts that agree up to position n —
pays only for the positions after them, and with a :class:`PrefixCache` from
``model.prefix_cache`` the prefixes are computed once for the whole sweep. Writes still see tensors
over every position (the reused ones zero and discarded), so run-aware selectors such as
``"last"`` count positions as in a full run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError
from mechkit.models.inputs import Batch
from mechkit.sites import Site


@dataclass(frozen=True, eq=False)
class PrefixCache:
    """The first ``n`` tokens of some prompts and, where the backend can reuse them, every layer's
    keys and values there (``layers`` is None for a backend that recomputes every position)."""

    n: int
    tokens: Tensor
    """``[distinct prefixes, n]`` token ids."""
    layers: tuple[tuple[Tensor, Tensor], ...] | None = None

    def rows_of(self, input_ids: Tensor) -> Tensor:
        """Index into :attr:`tokens` of each row's prefix (an error for a prefix it does not hold)."""
        index = {tuple(row): i for i, row in enumerate(self.tokens.tolist())}
        rows = []
        for r, row in enumerate(input_ids[:, : self.n].tolist()):
            if tuple(row) not in index:
                raise MechkitError(f"row {r} starts with tokens this prefix cache does not hold; build it with "
                                   "model.prefix_cache from the same prompts")
            rows.append(index[tuple(row)])
        return torch.tensor(rows, dtype=torch.long)

    def kwargs(self, batch: Batch) -> dict:
        """Forward arguments that run the later positions of ``batch`` on these prefixes (a fresh
        cache each call: a forward appends to it)."""
        from transformers import DynamicCache

        assert self.layers is not None
        rows = self.rows_of(batch.input_ids)
        return {"input_ids": batch.input_ids[:, self.n:], "attention_mask": batch.attention_mask,
                "cache": DynamicCache([(k[rows], v[rows]) for k, v in self.layers])}


def prefix_reusable(module: nn.Module) -> bool:
    """Whether ``module`` takes a key/value cache in one full-attention layout (no sliding windows)."""
    config = getattr(module, "config", None)
    if config is None or "cache" not in inspect.signature(module.forward).parameters:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    return not getattr(text, "sliding_window", None) and all(t == "full_attention" for t in layer_types)


def distinct_prefixes(input_ids: Tensor, n: int) -> Tensor:
    return torch.unique(input_ids[:, :n], dim=0)


def unedited_prefix(module: nn.Module, input_ids: Tensor, n: int) -> PrefixCache:
    """Keys and values of the first ``n`` positions of ``input_ids``, from one plain (unhooked) pass
    over its distinct prefixes (sweeps repeat a few prompts many times)."""
    tokens = distinct_prefixes(input_ids, n)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True)
    finally:
        module.train(was_training)
    return PrefixCache(n, tokens, tuple((k, v) for k, v, *_ in out.cache))


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
