"""Resolving an architecture table against a concrete HF model, verified by one dummy forward.

Shared by the ``torch_hooks`` and ``nnsight`` backends, which tap the same modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mechkit.errors import MechkitError, UnsupportedArchitectureError
from mechkit.models.arch import ArchTable, table_for
from mechkit.models.base import ModelInfo
from mechkit.models.taps import RunShape, Tap, pick
from mechkit.models.verify import expected_shape, verify
from mechkit.sites import GLOBAL_KINDS, Site

_CONFIG_KEYS = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads",),
    "d_head": ("head_dim",),
    "d_mlp": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
    "n_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok",),
}


def _config_value(config: Any, key: str) -> Any:
    for name in _CONFIG_KEYS[key]:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def info_from_config(config: Any, table: ArchTable, name: str, moe_layers: tuple[int, ...]) -> ModelInfo:
    dims = {key: _config_value(config, key) for key in _CONFIG_KEYS}
    if dims["n_layers"] is None or dims["d_model"] is None or dims["n_heads"] is None:
        raise UnsupportedArchitectureError(f"config of {name} lacks layer / width / head counts")
    dims["n_kv_heads"] = dims["n_kv_heads"] or dims["n_heads"]
    dims["d_head"] = dims["d_head"] or dims["d_model"] // dims["n_heads"]
    if dims["d_mlp"] is None:
        dims["d_mlp"] = 4 * dims["d_model"]  # GPT-2's n_inner=None convention
    if not moe_layers:
        dims["n_experts"] = dims["top_k"] = None
    n_ctx = getattr(config, table.n_ctx_key, None) if table.n_ctx_key else None
    return ModelInfo(
        name=name, architecture=table.name, moe_layers=moe_layers, encoder=table.encoder, n_ctx=n_ctx, **dims
    )


@dataclass
class SiteMap:
    """Which module (and how) each available site of one model is read from."""

    table: ArchTable
    info: ModelInfo
    taps: dict[Site, Tap]
    module_paths: dict[Site, str]
    unavailable: dict[str, str] = field(default_factory=dict)  # kind -> reason
    order: list[Site] = field(default_factory=list)  # execution order seen at verification

    def run_shape(self, batch: int, seq: int) -> RunShape:
        i = self.info
        return RunShape(batch, seq, i.n_heads, i.n_kv_heads, i.d_head, i.top_k, i.n_experts)


def _find_module(root: nn.Module, path: str, prefix: str) -> tuple[str, nn.Module] | None:
    candidates = [path]
    if path.startswith(prefix + "."):  # the user passed the base model without its LM head
        candidates.append(path[len(prefix) + 1 :])
    for candidate in candidates:
        try:
            return candidate, root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def build_sitemap(model: nn.Module, name: str) -> SiteMap:
    """Resolve the table for ``model`` and verify every declared site with one dummy forward."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no HF config; wrap it with module-path sites "
            f"(mechkit.load(module) and sites like 'module:encoder.layers.0')"
        )
    table = table_for(config.model_type, type(model).__name__)
    n_layers = _config_value(config, "n_layers")
    taps: dict[Site, Tap] = {}
    paths: dict[Site, str] = {}
    unavailable: dict[str, str] = {}
    for kind, tap in table.taps.items():
        condition = table.conditions.get(kind)
        if condition and getattr(config, condition[0], None) != condition[1]:
            unavailable[kind] = f"absent when config.{condition[0]} = {getattr(config, condition[0], None)!r}"
            continue
        layers = [None] if kind in GLOBAL_KINDS else range(n_layers)
        for layer in layers:
            found = _find_module(model, tap.path(layer), table.base_prefix)
            if found is not None:
                site = Site(kind, layer)
                taps[site], paths[site] = tap, found[0]
        if kind not in {s.kind for s in taps}:
            unavailable.setdefault(kind, f"{type(model).__name__} has no module {tap.module!r}")
    for kind in ("resid_pre", "resid_post"):
        if sum(s.kind == kind for s in taps) != n_layers:
            raise UnsupportedArchitectureError(
                f"the {table.name} table does not match {type(model).__name__}: {kind} is not found at every layer"
            )
    moe_layers = tuple(sorted(s.layer for s in taps if s.kind == "moe.topk"))
    info = info_from_config(config, table, name, moe_layers)
    _check_skips(table, taps)
    sitemap = SiteMap(table, info, taps, paths, unavailable)
    verify(model, sitemap)
    return sitemap


def _check_skips(table: ArchTable, taps: dict[Site, Tap]) -> None:
    """A ``skip`` must name a site of the same layer read as is (its write adds new − old there)."""
    for site, tap in taps.items():
        target = taps.get(Site(tap.skip, site.layer)) if tap.skip else None
        if tap.skip and (target is None or target.transform != "identity" or target.side != "output"):
            raise UnsupportedArchitectureError(
                f"the {table.name} table lets {site} carry its skip at {tap.skip}, which is not a plain output tap here"
            )


def unembed_with(module: nn.Module, sitemap: SiteMap, resid: torch.Tensor) -> torch.Tensor:
    """Decode residual vectors with the model's own final norm and unembedding (no hooks, no grad)."""
    paths = sitemap.module_paths
    if Site("logits") not in paths:
        raise MechkitError(f"{sitemap.info.name} has no unembedding to decode with")
    with torch.no_grad():
        x = module.get_submodule(paths[Site("ln_final")])(resid) if Site("ln_final") in paths else resid
        return module.get_submodule(paths[Site("logits")])(x)


__all__ = ["SiteMap", "build_sitemap", "expected_shape", "info_from_config", "pick", "unembed_with"]
