"""The reference backend: plain PyTorch forward hooks on an HF model or any ``nn.Module``.

Hooks exist only for the duration of one forward pass and are removed in ``finally``; one hook
per tapped module side handles every site on it (reads, writes and gradient taps, in order).
Attention patterns are served by mechkit's eager-equivalent attention function
(:mod:`mechkit.models.attention`), switched on only for forward passes that touch a pattern.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError
from mechkit.models import attention
from mechkit.models.base import Model, ModelInfo, WriteFn
from mechkit.models.execution import skipped
from mechkit.models.hf_forward import fingerprint, forward_kwargs, logits_of
from mechkit.models.inputs import Batch
from mechkit.models.prefix import PrefixCache, on_suffix, prefix_reusable, unedited_prefix
from mechkit.models.sitemap import SiteMap, build_sitemap, unembed_with
from mechkit.models.taps import ATTENTION_SIDES, RunShape, RunState, Tap, apply_entries, group_entries
from mechkit.sites import Site


class TorchHooksModel(Model):
    """Wrap an HF model (site table by ``config.model_type``) or any module (``module:<path>`` sites)."""

    backend = "torch_hooks"

    def __init__(self, module: nn.Module, tokenizer: Any = None, *, name: str | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        name = name or getattr(getattr(module, "config", None), "_name_or_path", "") or type(module).__name__
        self.module = module
        self._logits_to_keep: Tensor | None = None
        self._prefix: PrefixCache | None = None
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
        if self._prefix is not None:  # only the later positions run; writes see them in place
            write = {site: on_suffix(fn, site, self._prefix.n, batch.shape[1]) for site, fn in write.items()}
        rows, seq = batch.shape
        seq -= self._prefix.n if self._prefix is not None else 0
        shape = RunShape(rows, seq, i.n_heads or 1, i.n_kv_heads or 1, i.d_head or 1, i.top_k, i.n_experts)
        state = RunState(shape, grad)
        sites = list(dict.fromkeys([*write, *read]))
        plan = group_entries(sites, dict(write), set(read), lambda site: (self._path(site), self._tap(site)))
        handles = []
        edits: dict[nn.Module, attention.AttentionEdits] = {}  # served by mechkit's attention function
        was_training = self.module.training
        try:
            for (path, side), entries in plan.items():
                module = _submodule(self.module, path)
                if side in ATTENTION_SIDES:
                    edits.setdefault(module, attention.AttentionEdits()).put(side, _attention_edit(entries, state))
                elif side == "output":
                    handles.append(module.register_forward_hook(_output_hook(entries, state), with_kwargs=True))
                else:
                    handles.append(module.register_forward_pre_hook(_input_hook(entries, state), with_kwargs=True))
            self.module.eval()
            with attention.editable_patterns(self.module, edits) if edits else contextlib.nullcontext():
                output = self._call(batch)
        finally:
            for handle in handles:
                handle.remove()
            self.module.train(was_training)
        if state.pending:
            raise MechkitError(f"the residual skip of {', '.join(map(str, state.pending))} was never reached")
        logits = logits_of(output)
        if self._prefix is not None and self._logits_to_keep is None:  # the reused positions have none
            logits = torch.cat([logits.new_full((rows, self._prefix.n, logits.shape[-1]), float("nan")), logits], 1)
        return logits, state.store

    @contextlib.contextmanager
    def _skipping_below(self, layer: int) -> Iterator[None]:
        if self.sitemap is None:
            yield
            return
        blocks = [_submodule(self.module, self.sitemap.module_paths[Site("resid_pre", i)]) for i in range(layer)]
        with skipped(blocks):
            yield

    def prefix_cache(self, inputs: Any, n: int) -> PrefixCache:
        batch = self.to_tokens(inputs)
        tokens_only = super().prefix_cache(batch, n)
        if self.sitemap is None or self.info.encoder or not prefix_reusable(self.module):
            return tokens_only
        return unedited_prefix(self.module, batch.input_ids, n)

    @contextlib.contextmanager
    def _reusing_prefix(self, prefix: PrefixCache) -> Iterator[None]:
        if prefix.layers is None:
            yield
            return
        self._prefix = prefix
        try:
            yield
        finally:
            self._prefix = None

    @contextlib.contextmanager
    def _logits_only(self, positions: Tensor) -> Iterator[None]:
        if "logits_to_keep" not in inspect.signature(self.module.forward).parameters:
            yield
            return
        self._logits_to_keep = positions
        try:
            yield
        finally:
            self._logits_to_keep = None

    def _call(self, batch: Batch) -> Any:
        if self.sitemap is None:
            return self.module(batch.input_ids)
        kwargs = forward_kwargs(self.module, batch)
        keep = self._logits_to_keep
        if self._prefix is not None:
            kwargs.update(self._prefix.kwargs(batch))
            keep = None if keep is None else keep - self._prefix.n
        if keep is not None:  # HF computes the LM head only at these positions
            kwargs["logits_to_keep"] = keep
        return self.module(**kwargs)


def _output_hook(entries: list, state: RunState):
    def hook(module, args, kwargs, output):
        x = (args[0] if args else kwargs.get("hidden_states")) if _needs_input(entries) else None
        new, changed = apply_entries(entries, output, state, module, x)
        return new if changed else None

    return hook


def _needs_input(entries: list) -> bool:
    return any(tap.side == "head_input" for _, tap, _, _ in entries)


def _input_hook(entries: list, state: RunState):
    def hook(module, args, kwargs):
        if args:
            new, changed = apply_entries(entries, args[0], state)
            return ((new, *args[1:]), kwargs) if changed else None
        if "hidden_states" not in kwargs:
            raise MechkitError(f"cannot find the input tensor of {type(module).__name__}")
        new, changed = apply_entries(entries, kwargs["hidden_states"], state)
        return (args, {**kwargs, "hidden_states": new}) if changed else None

    return hook


def _attention_edit(entries: list, state: RunState):
    """A rewrite mechkit's attention function applies to a pattern, queries or keys (returning its
    argument itself if unchanged)."""

    def edit(x: Tensor) -> Tensor:
        return apply_entries(entries, x, state)[0]

    return edit


def _submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        from mechkit.errors import UnknownSiteError
        from mechkit.sites import nearest_names

        names = [n for n, _ in root.named_modules() if n]
        raise UnknownSiteError(f"no submodule {path!r}; {nearest_names(path, names)}") from None
