"""The reference backend: plain PyTorch forward hooks on an HF model or any ``nn.Module``.

Hooks exist only for the duration of one forward pass and are removed in ``finally``; one hook
per tapped module handles every site on it (reads, writes and gradient taps, in order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError
from mechkit.models.base import Model, ModelInfo, WriteFn
from mechkit.models.hf_forward import fingerprint, forward_kwargs, logits_of
from mechkit.models.inputs import Batch
from mechkit.models.sitemap import SiteMap, build_sitemap, unembed_with
from mechkit.models.taps import RunShape, Tap, apply_entries
from mechkit.sites import Site


class TorchHooksModel(Model):
    """Wrap an HF model (site table by ``config.model_type``) or any module (``module:<path>`` sites)."""

    backend = "torch_hooks"

    def __init__(self, module: nn.Module, tokenizer: Any = None, *, name: str | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        name = name or getattr(getattr(module, "config", None), "_name_or_path", "") or type(module).__name__
        self.module = module
        self.sitemap: SiteMap | None = None
        if hasattr(getattr(module, "config", None), "model_type"):
            self.sitemap = build_sitemap(module, name)
            info = self.sitemap.info
        else:
            info = ModelInfo(name=name, architecture="module", n_layers=0)
        super().__init__(info, tokenizer)

    @property
    def sites(self) -> list[Site]:
        if self.sitemap is None:
            return []
        return sorted(self.sitemap.taps, key=Site.sort_key)

    def _unsupported_reason(self, site: Site) -> str | None:
        return None if self.sitemap is None else self.sitemap.unavailable.get(site.kind)

    def _writable(self, site: Site) -> str | None:
        tap = self._tap(site)
        if tap.writable:
            return None
        reason = tap.readonly_reason or "the router has already chosen; edit blocks.L.moe.topk instead"
        return f"{site.kind} is read-only here ({reason})"

    @property
    def torch_module(self) -> nn.Module:
        return self.module

    def parameters_fingerprint(self) -> str:
        return fingerprint(self.module)

    def to_tokens(self, inputs: Any) -> Batch:
        if self.sitemap is None and isinstance(inputs, Tensor) and inputs.ndim >= 2:
            # a plain module takes any tensor; batch and sequence are its first two axes
            return Batch(inputs, torch.ones(inputs.shape[:2], dtype=torch.long))
        return super().to_tokens(inputs)

    def unembed(self, resid: Tensor) -> Tensor:
        if self.sitemap is None:
            return super().unembed(resid)
        return unembed_with(self.module, self.sitemap, resid)

    # -- the primitive --------------------------------------------------------------------------
    def _tap(self, site: Site) -> Tap:
        if site.kind == "module":
            return Tap(site.path or "")
        assert self.sitemap is not None
        return self.sitemap.taps[site]

    def _path(self, site: Site) -> str:
        if site.kind == "module":
            return site.path or ""
        assert self.sitemap is not None
        return self.sitemap.module_paths[site]

    def _run(
        self, batch: Batch, read: Sequence[Site], write: Mapping[Site, WriteFn], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        i = self.info
        shape = RunShape(*batch.shape, i.n_heads or 1, i.n_kv_heads or 1, i.d_head or 1, i.top_k, i.n_experts)
        plan: dict[tuple[str, str], list[tuple[Site, Tap, WriteFn | None, bool]]] = {}
        for site in list(dict.fromkeys([*write, *read])):
            tap = self._tap(site)
            plan.setdefault((self._path(site), tap.side), []).append((site, tap, write.get(site), site in read))
        store: dict[Site, Tensor] = {}
        handles = []
        was_training = self.module.training
        try:
            for (path, side), entries in plan.items():
                module = _submodule(self.module, path)
                hook = _make_hook(entries, side, shape, store, grad)
                if side == "output":
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
                else:
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            self.module.eval()
            if self.sitemap is None:
                output = self.module(batch.input_ids)
            else:
                output = self.module(**forward_kwargs(self.module, batch))
        finally:
            for handle in handles:
                handle.remove()
            self.module.train(was_training)
        return logits_of(output), store


def _make_hook(entries: list, side: str, shape: RunShape, store: dict[Site, Tensor], grad: bool):
    def process(raw: Any) -> tuple[Any, bool]:
        return apply_entries(entries, raw, shape, grad, store)

    if side == "output":

        def output_hook(module, args, kwargs, output):
            new, changed = process(output)
            return new if changed else None

        return output_hook

    def input_hook(module, args, kwargs):
        if args:
            new, changed = process(args[0])
            return ((new, *args[1:]), kwargs) if changed else None
        if "hidden_states" not in kwargs:
            raise MechkitError(f"cannot find the input tensor of {type(module).__name__}")
        new, changed = process(kwargs["hidden_states"])
        return (args, {**kwargs, "hidden_states": new}) if changed else None

    return input_hook


def _submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        from mechkit.errors import UnknownSiteError
        from mechkit.sites import nearest_names

        names = [n for n, _ in root.named_modules() if n]
        raise UnknownSiteError(f"no submodule {path!r}; {nearest_names(path, names)}") from None
