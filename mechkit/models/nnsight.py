"""The nnsight backend: the same site tables as ``torch_hooks``, read and written through nnsight traces.

``NNsightModel`` wraps an nnsight ``NNsight`` / ``TransformersModel`` / ``LanguageModel`` around an
HF model. Sites resolve against the underlying HF modules with the shared architecture tables
(:func:`~mechkit.models.sitemap.build_sitemap`) and the taps' ``get`` / ``put`` transforms, but
every read and write happens inside ``with model.trace(...)`` through ``.output`` / ``.inputs``,
``nnsight.save`` and assignment — no torch hooks are registered (nnsight 0.8 routes modules
through its own controllers, which are inert outside a trace).

One forward pass is one trace with one invoke. nnsight serves module values in execution order
within an invoke, so the modules to visit are sorted by ``sitemap.order`` (the order recorded by
the load-time verification forward). Gradients (``grad=True``) work as in the reference: the
site tensor is written back with ``put`` so the forward flows through the exact tensor returned.

Remote execution on NDIF
------------------------
``NNsightModel.remote("meta-llama/Llama-3.1-70B", name=...)`` (or
``mechkit.load(repo_id, backend="nnsight", remote=True)``) builds the model on the meta device
(config and tokenizer are fetched, weights are not), derives the site table from a meta-device
verification forward, and passes ``remote=True`` to every trace, so ``run_with_cache``,
``run_with_interventions`` and ``intervene`` run on NDIF. It needs hub access and an NDIF API key
(``nnsight.login()`` or ``nnsight.CONFIG.set_default_api_key(key)``). mechkit is not installed
on NDIF, so remote models register the package with ``nnsight.register("mechkit")``, which ships
its code by value with each request. Attention patterns need eager attention, which is requested
at load. ``NNsightModel(obj, remote="local")`` runs nnsight's local simulation of the remote path
(serialise, deserialise, run here) — the test suite uses it, since NDIF cannot be reached here.

Receiver sites work as in the reference: ``attn.in`` / ``mlp.in`` through the norms' ``.inputs``,
per-head q/k/v inputs by reading the projection's ``.inputs`` and rewriting its ``.output``, and a
``resid_mid`` write also adds (new − old) to the block's output (``resid_post``).

Not available with this backend (``SiteNotSupportedError``):

- ``module:<path>`` sites: nnsight needs every read of an invoke in execution order, and an
  arbitrary module has no place in the verified order (use ``torch_hooks``, or ``model.nnsight``).
- ``gradients`` with ``remote``: saved values come back from NDIF without their autograd graph.
- per-head q/k/v inputs with ``remote``: ``_REMOTE_HEAD_INPUTS``.
- writes to ``attn.pattern``: ``_PATTERN_WRITES`` (reads are the weights the attention module returns).
- any site the architecture table lacks for this model (same reasons as ``torch_hooks``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError, SiteNotSupportedError
from mechkit.models.base import Model, WriteFn
from mechkit.models.hf_forward import fingerprint, forward_kwargs, logits_of
from mechkit.models.inputs import Batch
from mechkit.models.sitemap import SiteMap, build_sitemap, unembed_with
from mechkit.models.taps import Entry, RunState, Tap, apply_entries, group_entries
from mechkit.sites import Site

_MODULE_SITES = (
    "nnsight serves module values in execution order within one invoke, and module:<path> sites have "
    "no place in the verified site order; use the torch_hooks backend, or nnsight directly via model.nnsight"
)
_ROTATED = ("the queries and keys after rotary embeddings live inside mechkit's attention function, which only "
            "the torch_hooks backend installs; use backend='torch_hooks'")
_PATTERN_WRITES = (
    "pattern writes go through mechkit's attention function, which only the torch_hooks backend installs; "
    "nnsight reads the weights the attention module returns. Use backend='torch_hooks' to replace patterns"
)
_REMOTE_HEAD_INPUTS = (
    "per-head q/k/v inputs recompute each head's projection from the module's weights inside the trace, "
    "which mechkit does not do in requests sent to NDIF; run them on a local model"
)
_REMOTE_GRADS = (
    "gradients are not available with remote execution: values saved on NDIF come back without their "
    "autograd graph. Run gradients on a local model"
)


class NNsightModel(Model):
    """Wrap an nnsight ``Envoy`` (``NNsight``, ``TransformersModel``, ``LanguageModel``) around an HF model."""

    backend = "nnsight"

    def __init__(self, wrapped: Any, tokenizer: Any = None, *, name: str | None = None, remote: bool | str = False):
        from nnsight import Envoy

        if not isinstance(wrapped, Envoy):
            raise TypeError(f"expected an nnsight model (NNsight, TransformersModel), not {type(wrapped).__name__}")
        module = wrapped._module
        config = getattr(module, "config", None)
        name = name or getattr(config, "_name_or_path", "") or getattr(wrapped, "repo_id", "") or type(module).__name__
        self.nnsight = wrapped
        self.remote_mode = remote
        if _on_meta(module):
            # Remote or not yet dispatched: verify the table with a shape-only forward on meta.
            with torch.device("meta"):
                self.sitemap: SiteMap = build_sitemap(module, name)
        else:
            self.sitemap = build_sitemap(module, name)
        _drop_rotated_heads(self.sitemap)
        self._key_rank = _key_ranks(self.sitemap, self._place)
        prefix = len(wrapped.path) + 1
        self._envoys = {path[prefix:]: envoy for path, envoy in wrapped.named_modules()}
        if remote:
            import nnsight

            nnsight.register("mechkit")  # NDIF does not have mechkit: ship its code by value
        super().__init__(self.sitemap.info, tokenizer if tokenizer is not None else getattr(wrapped, "tokenizer", None))

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any = None, *, name: str | None = None) -> NNsightModel:
        """Wrap an in-memory HF model with ``nnsight.NNsight``.

        Not ``TransformersModel``: mechkit tokenizes itself, and building a pipeline would set
        ``padding_side`` / ``pad_token`` on the caller's tokenizer and fails for encoders whose
        tokenizer has no mask token. Pass a ``TransformersModel`` to ``mechkit.load`` to use one.
        """
        from nnsight import NNsight

        with warnings.catch_warnings():  # BERT's `output` submodules: nnsight says it renames them
            warnings.filterwarnings("ignore", "Module .* has a submodule named 'output'", UserWarning)
            wrapped = NNsight(hf_model)
        return cls(wrapped, tokenizer, name=name)

    @classmethod
    def remote(cls, repo_id: str, *, name: str | None = None, **kwargs: Any) -> NNsightModel:
        """A model that runs on NDIF: built on the meta device here, every trace sent with ``remote=True``."""
        from nnsight import TransformersModel

        kwargs.setdefault("task", "text-generation")  # LanguageModel's task, without its deprecation
        kwargs.setdefault("attn_implementation", "eager")  # attention patterns need eager attention
        # nnsight 0.8.1 reads transformers' removed `_load_tokenizer` flags, so its meta build
        # passes no tokenizer and the pipeline cannot guess one: name it explicitly.
        kwargs.setdefault("tokenizer", repo_id)
        return cls(TransformersModel(repo_id, **kwargs), name=name or repo_id, remote=True)

    # -- Model interface --------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The underlying HF model (nnsight swaps it when a lazily loaded model is dispatched)."""
        return self.nnsight._module

    @property
    def sites(self) -> list[Site]:
        return sorted((s for s in self.sitemap.taps if not self._remote_refuses(s)), key=Site.sort_key)

    def _unsupported_reason(self, site: Site) -> str | None:
        if site.kind == "module":
            return _MODULE_SITES
        if self._remote_refuses(site):
            return _REMOTE_HEAD_INPUTS
        return self.sitemap.unavailable.get(site.kind)

    def _writable(self, site: Site) -> str | None:
        if site.kind == "module":
            return _MODULE_SITES
        tap = self._place(site)[1]
        if tap.writable:
            return None
        reason = tap.readonly_reason or "the router has already chosen; edit blocks.L.moe.topk instead"
        return f"{site.kind} is read-only here ({reason})"

    @property
    def torch_module(self) -> nn.Module:
        return self.module

    def parameters_fingerprint(self) -> str:
        module = self.module
        if not _on_meta(module):
            return fingerprint(module)
        # Remote weights live on the server: fingerprint the structure that is known here.
        digest = hashlib.sha256(b"meta")
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        return digest.hexdigest()

    def unembed(self, resid: Tensor) -> Tensor:
        return unembed_with(self.module, self.sitemap, resid)

    # -- the primitive ----------------------------------------------------------------------------
    def _place(self, site: Site) -> tuple[str, Tap]:
        """Module path and tap of a site as this backend reaches it (patterns: the module's returned weights)."""
        tap = self.sitemap.taps[site]
        if tap.side == "pattern":
            tap = Tap(tap.module, "output", item=1, writable=False, readonly_reason=_PATTERN_WRITES)
        return self.sitemap.module_paths[site], tap

    def _locate(self, site: Site) -> tuple[str, Tap]:
        if site.kind == "module":
            raise SiteNotSupportedError(f"{site} is not available with the nnsight backend: {_MODULE_SITES}")
        if self._remote_refuses(site):
            raise SiteNotSupportedError(f"{site} is not available with remote execution: {_REMOTE_HEAD_INPUTS}")
        return self._place(site)

    def _remote_refuses(self, site: Site) -> bool:
        return bool(self.remote_mode) and site in self.sitemap.taps and self.sitemap.taps[site].side == "head_input"

    def _plan(self, read: Sequence[Site], write: Mapping[Site, WriteFn]) -> list[tuple[Any, str, list[Entry]]]:
        """Group sites by (module, side) and order the groups as the forward pass reaches them."""
        groups = group_entries(list(dict.fromkeys([*write, *read])), dict(write), set(read), self._locate)
        ordered = sorted(groups.items(), key=lambda kv: self._key_rank[kv[0]])
        return [(self._envoys[path], side, entries) for (path, side), entries in ordered]

    def _run(
        self, batch: Batch, read: Sequence[Site], write: Mapping[Site, WriteFn], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        import nnsight

        if grad and self.remote_mode:
            raise SiteNotSupportedError(_REMOTE_GRADS)
        plan = self._plan(read, write)
        shape = self.sitemap.run_shape(*batch.shape)
        root = self.nnsight
        inputs = forward_kwargs(self.module, batch)
        trace_kwargs = {"remote": self.remote_mode} if self.remote_mode else {}
        was_training = self.module.training
        self.module.eval()
        try:
            with root.trace(**inputs, **trace_kwargs):
                state = RunState(shape, grad, by_name=True)
                for envoy, side, entries in plan:
                    _visit(envoy, side, entries, state)
                result = nnsight.save((logits_of(root.output), state.store))
        finally:
            self.module.train(was_training)  # the module itself, if the trace just dispatched it
        logits, store = result
        # keyed by name inside the trace: plain strings travel to NDIF and back unchanged
        return logits, {Site.parse(name): value for name, value in store.items()}


def _key_ranks(sitemap: SiteMap, locate) -> dict[tuple[str, str], int]:
    """When the forward pass first reaches each (module, hook side), from the verified site order."""
    ranks: dict[tuple[str, str], int] = {}
    for i, site in enumerate(sitemap.order):
        path, tap = locate(site)
        ranks.setdefault((path, tap.hook_side), i)
    return ranks


def _visit(envoy: Any, side: str, entries: list[Entry], state: RunState) -> None:
    """Inside a trace: read one module side, process its sites, and write it back if anything changed."""
    if side == "output":
        x = _first_input(envoy) if any(tap.side == "head_input" for _, tap, _, _ in entries) else None
        raw = envoy.output
        new, changed = apply_entries(entries, raw, state, envoy._module, x)
        if changed:
            envoy.output = new
        return
    args, kwargs = envoy.inputs
    if not args and "hidden_states" not in kwargs:
        raise MechkitError(f"cannot find the input tensor of {envoy.path}")
    raw = args[0] if args else kwargs["hidden_states"]
    new, changed = apply_entries(entries, raw, state)
    if changed:
        envoy.inputs = ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})


def _first_input(envoy: Any) -> Tensor:
    args, kwargs = envoy.inputs
    return args[0] if args else kwargs["hidden_states"]


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


__all__ = ["NNsightModel"]


def _drop_rotated_heads(sitemap: SiteMap) -> None:
    """Rotated queries and keys exist only inside mechkit's attention function, which this backend
    does not install."""
    for site in [s for s, tap in sitemap.taps.items() if tap.side in ("rot_q", "rot_k")]:
        del sitemap.taps[site], sitemap.module_paths[site]
        sitemap.unavailable[site.kind] = _ROTATED
    sitemap.order = [s for s in sitemap.order if s in sitemap.taps]
