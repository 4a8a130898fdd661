"""Router weight matrices W_ℓ ``[experts, d_model]`` per MoE layer, for the routing embeddings of
METHODS §6.

The router of every supported family is a linear map whose ``weight`` is ``[experts, d_model]``;
families differ only in the module's name (GPT-OSS: ``mlp.router``, the others ``mlp.gate``).
GPT-OSS routers also carry a bias, which the routing embedding does not use.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["ROUTER_MODULES", "router_weights"]

ROUTER_MODULES = {"olmoe": "gate", "mixtral": "gate", "qwen2_moe": "gate", "qwen3_moe": "gate",
                  "deepseek_v3": "gate", "gpt_oss": "router"}
"""model_type → name of the router under each MoE layer's ``mlp``."""


def router_weights(model: Any) -> list[Tensor]:
    """W_ℓ ``[experts, d_model]`` (detached, float) for each MoE layer of ``model`` (``model.info.moe_layers``)."""
    info = model.info
    if not info.moe_layers:
        raise MechkitError(f"{info.name} has no MoE layers, so it has no router weights; pass a mixture-of-experts "
                           "model (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V3, GPT-OSS)")
    module = model.torch_module
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    names = sorted(set(ROUTER_MODULES.values())) if model_type not in ROUTER_MODULES else [ROUTER_MODULES[model_type]]
    params = dict(module.named_parameters())
    weights = []
    for layer in info.moe_layers:
        pattern = re.compile(rf"(^|\.)(layers|blocks)\.{layer}\.mlp\.({'|'.join(names)})"
                             r"(\.original_component)?\.weight$")
        found = [p for name, p in params.items() if pattern.search(name)]
        if len(found) != 1:
            raise MechkitError(f"cannot find the router weight of MoE layer {layer} in {info.name} "
                               f"(model_type {model_type!r}; looked for layers.{layer}.mlp.{'/'.join(names)}.weight); "
                               f"known families: {', '.join(ROUTER_MODULES)}")
        w = found[0].detach().float()
        if info.n_experts is not None and tuple(w.shape) != (info.n_experts, info.d_model):
            raise MechkitError(f"router weight of layer {layer} has shape {tuple(w.shape)}, expected "
                               f"[{info.n_experts}, {info.d_model}] (experts × d_model)")
        weights.append(w)
    return weights
