"""The one Model interface every backend implements.

Backends implement a single primitive, :meth:`Model._run`: one forward pass that reads some
sites, rewrites others and (optionally) keeps the autograd graph. Everything users call —
``run_with_cache``, ``run_with_interventions``, ``intervene``, ``gradients`` — is built here on
top of it, so the behaviour (site resolution, errors, provenance, hook hygiene) is identical
across backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from mechkit.models.cache import ActivationCache, narrow, widen
from mechkit.errors import MechkitError, SiteNotSupportedError, UnknownSiteError
from mechkit.models.inputs import Batch, prepare_inputs
from mechkit.provenance import provenance
from mechkit.sites import MOE_KINDS, Site, nearest_names, select

SiteSpec = Union[str, Site, Sequence[str | Site]]
WriteFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ModelInfo:
    """Dimensions and identity of a wrapped model."""

    name: str
    architecture: str
    n_layers: int
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    vocab_size: int | None = None
    n_experts: int | None = None
    top_k: int | None = None
    moe_layers: tuple[int, ...] = ()
    encoder: bool = False
    n_ctx: int | None = None  # hard context limit (learned position embeddings); None when unbounded


@dataclass(frozen=True)
class GradientResult:
    """A metric's value plus activations and d(metric)/d(activation) at the requested sites."""

    value: Tensor
    logits: Tensor
    activations: ActivationCache
    grads: ActivationCache


class Model:
    """A wrapped transformer with one site vocabulary, whatever the backend."""

    backend: str = "abstract"

    def __init__(self, info: ModelInfo, tokenizer: Any = None) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self._context_writes: list[dict[Site, Any]] = []

    # -- to implement per backend ---------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """Every site this model exposes, in execution order."""
        raise NotImplementedError

    def _run(
        self, batch: Batch, read: Sequence[Site], write: Mapping[Site, WriteFn], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        """One forward pass: returns (logits, {site: tensor}) for the base sites in ``read``."""
        raise NotImplementedError

    def _unsupported_reason(self, site: Site) -> str | None:
        """Why a site of the vocabulary cannot be read here (None when it can)."""
        return None

    def _writable(self, site: Site) -> str | None:
        """Why a site cannot be written (None when it can)."""
        return None

    def parameters_fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def torch_module(self) -> Any:
        """The wrapped ``nn.Module`` (HF model, HookedTransformer / Bridge) — for dtype and provenance."""
        raise NotImplementedError

    def unembed(self, resid: Tensor) -> Tensor:
        """Decode residual-stream vectors [..., d_model] to logits with the model's final norm and
        unembedding (the logit lens)."""
        raise SiteNotSupportedError(f"the {self.backend} backend cannot decode residual vectors")

    # -- sites --------------------------------------------------------------------------------
    def resolve(self, specs: SiteSpec) -> list[Site]:
        """Names, Sites or globs → validated sites in execution order."""
        specs_list = [specs] if isinstance(specs, (str, Site)) else list(specs)
        for spec in specs_list:
            if isinstance(spec, (str, Site)):
                self._check_one(spec)
            else:
                raise TypeError(f"a site is a str or Site, got {type(spec).__name__}: {spec!r}")
        return select(specs_list, self.sites)

    def _check_one(self, spec: str | Site) -> None:
        if isinstance(spec, str) and any(c in spec for c in "*?["):
            return
        site = Site.parse(spec)
        if site.kind == "module" or site.base in set(self.sites):
            self._check_narrowing(site)
            return
        info, names = self.info, [str(s) for s in self.sites]
        if site.layer is not None and not 0 <= site.layer < info.n_layers:
            raise UnknownSiteError(
                f"{site}: layer {site.layer} is out of range; {info.name} has {info.n_layers} layers "
                f"(0–{info.n_layers - 1})"
            )
        if site.kind in MOE_KINDS and site.layer not in info.moe_layers:
            if not info.moe_layers:
                raise UnknownSiteError(f"{site}: {info.name} is a dense model and has no MoE routers")
            raise UnknownSiteError(f"{site}: layer {site.layer} is dense; MoE layers are {list(info.moe_layers)}")
        if (reason := self._unsupported_reason(site.base)) is not None:
            raise SiteNotSupportedError(f"{site} is not available with the {self.backend} backend: {reason}")
        raise UnknownSiteError(f"{info.name} has no site {str(site)!r}; {nearest_names(str(site.base), names)}")

    def _check_narrowing(self, site: Site) -> None:
        info = self.info
        if site.head is not None:
            n = info.n_kv_heads if site.kind in ("attn.k", "attn.v") else info.n_heads
            if n is not None and site.head >= n:
                raise UnknownSiteError(f"{site}: head {site.head} is out of range; {site.kind} has {n} heads")
        if site.expert is not None and info.n_experts is not None and site.expert >= info.n_experts:
            raise UnknownSiteError(f"{site}: expert {site.expert} is out of range; there are {info.n_experts}")

    # -- inputs -------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> Batch:
        """Tokenize and right-pad a batch of texts (the tokenizer object is never modified)."""
        return prepare_inputs(texts, self.tokenizer)

    def to_tokens(self, inputs: Any) -> Batch:
        return prepare_inputs(inputs, self.tokenizer)

    # -- running ------------------------------------------------------------------------------
    def __call__(self, inputs: Any) -> Tensor:
        return self.forward(inputs)

    def forward(self, inputs: Any) -> Tensor:
        """Logits (or final hidden states for encoders), with any active ``intervene`` context."""
        logits, _ = self._execute(self.to_tokens(inputs), [], {}, grad=False)
        return logits

    def run_with_cache(
        self, inputs: Any, sites: SiteSpec, *, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, ActivationCache]:
        """Run once and return (logits, cache of ``sites``)."""
        batch = self.to_tokens(inputs)
        read = self.resolve(sites)
        logits, acts = self._execute(batch, read, {}, grad=False)
        if dtype is not None:
            acts = {s: t.to(dtype) for s, t in acts.items()}
        return logits, self._cache(acts, batch, read)

    def run_with_interventions(
        self,
        inputs: Any,
        interventions: Mapping[str | Site, Any],
        *,
        cache: SiteSpec | None = None,
    ) -> Tensor | tuple[Tensor, ActivationCache]:
        """Run with ``{site: intervention}`` applied; also return a cache when ``cache`` names sites."""
        batch = self.to_tokens(inputs)
        read = self.resolve(cache) if cache is not None else []
        logits, acts = self._execute(batch, read, self._writes(interventions), grad=False)
        return (logits, self._cache(acts, batch, read)) if cache is not None else logits

    @contextlib.contextmanager
    def intervene(self, interventions: Mapping[str | Site, Any]) -> Iterator[Model]:
        """Apply interventions to every run of this model inside the block; removed on exit, always."""
        writes = self._writes(interventions)
        self._context_writes.append(writes)
        try:
            yield self
        finally:
            self._context_writes.remove(writes)

    def gradients(
        self,
        inputs: Any,
        sites: SiteSpec,
        metric: Callable[[Tensor, Batch], Tensor],
        *,
        interventions: Mapping[str | Site, Any] | None = None,
    ) -> GradientResult:
        """d metric / d activation at ``sites`` (one forward, one backward; parameters get no .grad)."""
        batch = self.to_tokens(inputs)
        read = self.resolve(sites)
        logits, acts = self._execute(batch, read, self._writes(interventions or {}), grad=True)
        value = metric(logits, batch)
        if not isinstance(value, Tensor) or not value.requires_grad:
            raise MechkitError("metric(logits, batch) must return a tensor computed from the logits")
        order = list(acts)
        grads = torch.autograd.grad(value.sum(), [acts[s] for s in order], allow_unused=True)
        grads = [torch.zeros_like(acts[s]) if g is None else g for s, g in zip(order, grads)]
        detached = {s: t.detach() for s, t in acts.items()}
        return GradientResult(
            value=value.detach(),
            logits=logits.detach(),
            activations=self._cache(detached, batch, read),
            grads=self._cache(dict(zip(order, grads)), batch, read),
        )

    # -- internals ----------------------------------------------------------------------------
    def _writes(self, interventions: Mapping[str | Site, Any]) -> dict[Site, list[tuple[Site, Any]]]:
        """Group interventions by base site; narrowed sites (heads/experts) become slice edits."""
        if not isinstance(interventions, Mapping):
            raise TypeError("interventions must be a mapping {site: intervention}")
        grouped: dict[Site, list[tuple[Site, Any]]] = {}
        for spec, iv in interventions.items():
            for site in self.resolve(spec):
                if not callable(iv):
                    raise TypeError(f"intervention for {site} must be callable(act, site), got {type(iv).__name__}")
                if (reason := self._writable(site.base)) is not None:
                    raise SiteNotSupportedError(f"cannot intervene on {site}: {reason}")
                grouped.setdefault(site.base, []).append((site, iv))
        return grouped

    def _execute(
        self, batch: Batch, read: Sequence[Site], writes: Mapping[Site, list], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        merged: dict[Site, list] = {}
        for group in [*self._context_writes, writes]:
            for base, items in group.items():
                merged.setdefault(base, []).extend(items)
        write_fns = {base: _compose(items) for base, items in merged.items()}
        bases = list(dict.fromkeys(s.base for s in read))
        with torch.set_grad_enabled(grad):
            logits, acts = self._run(batch, bases, write_fns, grad)
        missing = [s for s in bases if s not in acts]
        if missing:
            raise MechkitError(f"sites {', '.join(map(str, missing))} did not fire during the forward pass")
        return logits, {s: narrow(acts[s.base], s) for s in read}

    def _cache(self, acts: dict[Site, Tensor], batch: Batch, read: Sequence[Site]) -> ActivationCache:
        record = provenance(self, read, input_shape=list(batch.input_ids.shape))
        return ActivationCache(acts, record, batch.attention_mask)


def _compose(items: list[tuple[Site, Any]]) -> WriteFn:
    def apply(act: Tensor) -> Tensor:
        for site, iv in items:
            if site.head is None and site.expert is None:
                act = iv(act, site)
            else:
                act = widen(act, site, iv(narrow(act, site), site))
        return act

    return apply
