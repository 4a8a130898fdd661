"""Routing capture: per token and MoE layer, the router's probabilities over all experts and the
experts the model chose, read through the ``blocks.L.moe.router`` / ``blocks.L.moe.topk`` sites (so any
backend and MoE family that exposes them works).

``capture_routing(model, prompts)`` → :class:`RoutingTrace` with ``probs[layer]`` ``[n, T, E]``
(softmax over all experts of the router logits), ``chosen[layer]`` ``[n, T, E]`` (the model's top-k, as
a mask) and ``mask`` ``[n, T]`` (real tokens). Padding is zero in every tensor and never averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.moe.functional import pathway_strings
from mechkit.provenance import provenance
from mechkit.results import Result

__all__ = ["RoutingTrace", "capture_routing"]


@dataclass(frozen=True, eq=False)
class RoutingTrace(Result):
    """Router probabilities and chosen experts per MoE layer (``layers`` lists their indices)."""

    layers: list[int]
    probs: list[Tensor]
    chosen: list[Tensor] | None
    mask: Tensor

    def sample_routing(self) -> list[Tensor]:
        """Per layer ``[n, E]``: each sample's probabilities averaged over its real tokens."""
        counts = self.mask.sum(1, keepdim=True).double()
        if (counts == 0).any():
            raise MechkitError("a sample with no tokens has no pathway; drop empty prompts")
        return [(p.double() * self.mask[..., None]).sum(1) / counts for p in self.probs]

    def pathways(self, tau: float = 0.7) -> list[str]:
        """METHODS §6 pathway strings of every sample."""
        return pathway_strings(self.sample_routing(), tau)

    def expert_load(self) -> Tensor:
        """``[layers, E]``: share of the chosen (token, expert) slots that go to each expert."""
        if self.chosen is None:
            raise MechkitError("this trace holds no chosen experts (the backend has no moe.topk site)")
        counts = torch.stack([(c.bool() & self.mask[..., None].bool()).sum((0, 1)).double() for c in self.chosen])
        return counts / counts.sum(-1, keepdim=True)


def capture_routing(model: Any, prompts: Sequence[str], *, batch_size: int = 32) -> RoutingTrace:
    """Route ``prompts`` through ``model`` and record every MoE layer (see the module doc)."""
    layers = list(getattr(model.info, "moe_layers", ()) or ())
    if not layers:
        raise MechkitError(f"{getattr(model.info, 'name', 'this model')} has no MoE layers (no moe.router sites); "
                           "routing capture needs a mixture-of-experts model such as OLMoE or Mixtral")
    prompts = list(prompts)
    if not prompts:
        raise MechkitError("no prompts to route")
    sites = [f"blocks.{i}.moe.router" for i in layers]
    topk = [f"blocks.{i}.moe.topk" for i in layers]
    have_topk = all(_readable(model, s) for s in topk)
    batches = [model.tokenize(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    width = max(b.attention_mask.shape[1] for b in batches)
    probs, chosen, masks = [[] for _ in layers], [[] for _ in layers], []
    for batch in batches:
        cache = model.run_with_cache(batch, sites + (topk if have_topk else [])).cache
        real = batch.attention_mask.bool()
        masks.append(_pad(real.float(), width))
        for j, site in enumerate(sites):
            probs[j].append(_pad(cache[site].float().softmax(-1) * real[..., None], width))
            if have_topk:
                chosen[j].append(_pad((cache[topk[j]] != 0).float() * real[..., None], width))
    return RoutingTrace(layers=layers, probs=[torch.cat(p) for p in probs],
                        chosen=[torch.cat(c) for c in chosen] if have_topk else None, mask=torch.cat(masks),
                        provenance=provenance(model, sites))


def _readable(model: Any, site: str) -> bool:
    try:
        model.resolve(site)
    except MechkitError:
        return False
    return True


def _pad(t: Tensor, width: int) -> Tensor:
    extra = width - t.shape[1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, extra))
