"""Routing capture: per token and MoE layer, the router's probabilities over all experts and the
experts the model chose, read through the ``blocks.L.moe.router`` / ``blocks.L.moe.topk`` sites (so any
backend and MoE family that exposes them works).

``capture_routing(model, prompts)`` → :class:`RoutingTrace` with ``probs[layer]`` ``[n, T, E]``
(softmax over all experts of the router logits), ``chosen[layer]`` ``[n, T, E]`` (the model's top-k, as
a mask) and ``mask`` ``[n, T]`` (real tokens). Padding is zero in every tensor and never averaged.

For datasets too large for one pass in memory, collect the same sites into an ActivationStore and
rebuild the trace (or only the per-sample routing, which never pads) from it::

    store = mechkit.collect(model, prompts, routing_sites(model), "routing/")
    trace = RoutingTrace.from_store(store)          # or store_sample_routing(store)
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

__all__ = ["RoutingTrace", "capture_routing", "routing_sites", "store_sample_routing"]


@dataclass(frozen=True, eq=False)
class RoutingTrace(Result):
    """Router probabilities and chosen experts per MoE layer (``layers`` lists their indices)."""

    layers: list[int]
    probs: list[Tensor]
    chosen: list[Tensor] | None
    mask: Tensor

    @classmethod
    def from_store(cls, store: Any) -> RoutingTrace:
        """The trace of the prompts collected into an ActivationStore at :func:`routing_sites`."""
        layers, topk = _store_layers(store)
        prompt, position = store.prompt_indices.load().long(), store.positions.load().long()
        n, width = int(prompt.max()) + 1, int(position.max()) + 1
        mask = torch.zeros(n, width)
        mask[prompt, position] = 1.0

        def scatter(rows: Tensor) -> Tensor:
            out = torch.zeros(n, width, rows.shape[-1])
            out[prompt, position] = rows.float()
            return out

        probs = [scatter(store[f"blocks.{i}.moe.router"].load().float().softmax(-1)) for i in layers]
        chosen = [scatter((store[f"blocks.{i}.moe.topk"].load() != 0).float()) for i in layers] if topk else None
        return cls(layers=layers, probs=probs, chosen=chosen, mask=mask, provenance=store.provenance)

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
    layers = _moe_layers(model)
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


def routing_sites(model: Any) -> list[str]:
    """The router (and, where the backend has it, top-k) sites of every MoE layer of ``model``."""
    layers = _moe_layers(model)
    topk = [f"blocks.{i}.moe.topk" for i in layers]
    return [f"blocks.{i}.moe.router" for i in layers] + (topk if all(_readable(model, s) for s in topk) else [])


def store_sample_routing(store: Any) -> list[Tensor]:
    """Per MoE layer ``[prompts, E]``: each prompt's router probabilities averaged over its stored tokens,
    read one layer at a time (no padded ``[n, T, E]`` tensor is built)."""
    layers, _ = _store_layers(store)
    prompt = store.prompt_indices.load().long()
    n = int(prompt.max()) + 1
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, prompt, torch.ones(len(prompt), dtype=torch.float64))
    if (counts == 0).any():
        raise MechkitError("a prompt with no stored tokens has no pathway; collect with positions='all'")
    out = []
    for i in layers:
        probs = store[f"blocks.{i}.moe.router"].load().double().softmax(-1)
        out.append(torch.zeros(n, probs.shape[-1], dtype=torch.float64).index_add_(0, prompt, probs) / counts[:, None])
    return out


def _store_layers(store: Any) -> tuple[list[int], bool]:
    router = sorted(s.layer for s in store.sites if s.kind == "moe.router" and s.head is None and s.expert is None)
    if not router:
        raise MechkitError(f"{store.path} holds no moe.router sites; collect routing_sites(model) into it")
    topk = {s.layer for s in store.sites if s.kind == "moe.topk"} >= set(router)
    return router, topk


def _moe_layers(model: Any) -> list[int]:
    layers = list(getattr(model.info, "moe_layers", ()) or ())
    if not layers:
        raise MechkitError(f"{getattr(model.info, 'name', 'this model')} has no MoE layers (no moe.router sites); "
                           "routing capture needs a mixture-of-experts model such as OLMoE or Mixtral")
    return layers


def _readable(model: Any, site: str) -> bool:
    try:
        model.resolve(site)
    except MechkitError:
        return False
    return True


def _pad(t: Tensor, width: int) -> Tensor:
    extra = width - t.shape[1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, extra))
