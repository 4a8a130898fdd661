"""The one Model interface every backend implements.

Backends implement a single primitive, :meth:`Model._run`: one forward pass that reads some
sites, rewrites others and (optionally) keeps the autograd graph. Everything users call —
``run_with_cache``, ``run_with_interventions``, ``intervene``, ``splice``, ``gradients`` — is
built here on top of it, so the behaviour (site resolution, padding, errors, provenance, hook
hygiene) is identical across backends.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from mechkit.errors import MechkitError, SiteNotSupportedError, UnknownSiteError
from mechkit.models import resume
from mechkit.models.cache import ActivationCache, narrow
from mechkit.models.execution import Items, RunEdits, WriteFn
from mechkit.models.inputs import Batch, prepare_inputs
from mechkit.models.prefix import PrefixCache
from mechkit.models.splice import Splice
from mechkit.provenance import provenance
from mechkit.selection import RunContext
from mechkit.sites import KV_HEAD_KINDS, MOE_KINDS, Site, is_pattern, nearest_names, select

SiteSpec = Union[str, Site, Sequence[Union[str, Site]]]


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


class Run(NamedTuple):
    """What ``run_with_cache`` and ``run_with_interventions`` return.

    ``logits``: [batch, pos, vocab] (final hidden states for encoders). ``cache``: the requested
    sites (empty when none were asked), with the run's attention mask and provenance.
    Unpacks as ``logits, cache = model.run_with_cache(...)``.
    """

    logits: Tensor
    cache: ActivationCache


@dataclass(frozen=True, eq=False)
class GradientResult:
    """The result of :meth:`Model.gradients`.

    ``value``: the metric, a detached scalar tensor. ``logits``: the run's logits, detached.
    ``activations``: the requested sites' values (detached). ``grads``: d value / d activation at
    each requested site, same shapes as ``activations`` (zeros where the metric does not depend on
    the site). Both caches carry the run's attention mask.
    """

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
        self._context_writes: list[dict[Site, Items]] = []
        self._splices: list[Splice] = []

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
        """Names, Sites or globs → validated sites in execution order (splice parts included)."""
        specs_list = [specs] if isinstance(specs, (str, Site)) else _as_list(specs)
        for spec in specs_list:
            if not isinstance(spec, (str, Site)):
                hint = f"; for layer {spec} write e.g. 'blocks.{spec}.resid_post'" if isinstance(spec, int) else ""
                raise TypeError(f"a site is a str or Site, got {type(spec).__name__} {spec!r}{hint}")
            self._check_one(spec)
        parts = self._splice_sites()
        rank = {site: i + 1 for i, site in enumerate(parts)}  # splice parts follow their module's order
        chosen = select(specs_list, [*self.sites, *parts])
        return sorted(chosen, key=lambda s: (s.host.sort_key() if s.splice else s.sort_key(), rank.get(s, 0)))

    def _splice_sites(self) -> list[Site]:
        return [site for splice in self._splices for site in splice.sites]

    def _check_one(self, spec: str | Site) -> None:
        if isinstance(spec, str) and is_pattern(spec):
            return
        site = Site.parse(spec)
        if site.splice is not None:
            return self._check_splice_part(site)
        if site.kind == "module" or site.base in set(self.sites):
            return self._check_narrowing(site)
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

    def _check_splice_part(self, site: Site) -> None:
        self._check_one(site.host)
        name = site.splice.split(".")[0]
        matching = [s for s in self._splices if s.host == site.host and s.name == name]
        if not matching:
            active = ", ".join(f"{s.host}.{s.name}" for s in self._splices) or "none"
            raise UnknownSiteError(
                f"{site}: no module is spliced at {site.host} as {name!r} (active splices: {active}); "
                f"wrap the call in `with model.splice('{site.host}', module, name='{name}'):`"
            )
        if site not in matching[-1].sites:
            names = [str(s) for s in matching[-1].sites]
            raise UnknownSiteError(f"{site} is not a part of that splice; {nearest_names(str(site), names)}")

    def _check_narrowing(self, site: Site) -> None:
        info = self.info
        if site.head is not None:
            n = info.n_kv_heads if site.kind in KV_HEAD_KINDS else info.n_heads
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
        """Logits (or final hidden states for encoders), with any active ``intervene`` / ``splice``."""
        logits, _ = self._execute(self.to_tokens(inputs), [], {}, grad=False)
        return logits

    def run_with_cache(self, inputs: Any, sites: SiteSpec, *, dtype: torch.dtype | None = None) -> Run:
        """Run once and return ``Run(logits, cache)`` with the activations at ``sites``."""
        batch = self.to_tokens(inputs)
        read = self.resolve(sites)
        logits, acts = self._execute(batch, read, {}, grad=False)
        if dtype is not None:
            acts = {s: t.to(dtype) for s, t in acts.items()}
        return Run(logits, self._cache(acts, batch, read))

    def run_with_interventions(
        self, inputs: Any, interventions: Mapping[str | Site, Any], *, cache: SiteSpec | None = None,
        start: tuple[str | Site, Tensor] | None = None, logits_at: str | None = None,
        prefix: int | PrefixCache = 0,
    ) -> Run:
        """Run with ``{site: intervention}`` applied; always returns ``Run(logits, cache)``.

        ``cache`` names sites to record (after the interventions); the cache is empty otherwise.
        ``start=("blocks.L.resid_pre", value)`` resumes a run from a known residual stream: block L
        reads ``value`` ([batch, pos, d_model], e.g. from a cache of the same inputs) and the blocks
        below it are skipped where the backend can skip them (torch_hooks, HookedTransformer; the
        others compute them and discard the result), so sweeps that patch layer L and above pay only
        for the layers they change. Sites below L can be neither read nor written in such a run.
        ``logits_at="last"`` computes logits only at each row's last real token (NaN elsewhere):
        where the unembedding is large, it is a good part of a forward that a metric reading the
        last token does not need.
        ``prefix=n`` promises that the edits leave the first ``n`` positions of every row as the
        unedited run has them (e.g. patching between prompts that agree up to position n): the
        backend may then reuse them instead of recomputing (torch_hooks on HF decoders runs only the
        later positions, with the keys and values of one pass over the distinct prefixes); their
        logits are NaN and such a run records no sites. ``prefix=model.prefix_cache(prompts, n)``
        computes those prefixes once for many runs over the same prompts.
        """
        batch = self.to_tokens(inputs)
        read = self.resolve(cache) if cache is not None else []
        writes = self._writes(interventions)
        last = resume.kept_positions(self, logits_at, batch, [*read, *writes])
        if isinstance(prefix, int) and not isinstance(prefix, bool) and prefix > 0:
            resume.check_prefix(self, prefix, batch, read, writes)
            prefix = self.prefix_cache(batch, prefix)
        resume.check_prefix(self, prefix, batch, read, writes)
        skip = contextlib.nullcontext()
        if start is not None:
            site, value = resume.start_site(self, start, batch, [*read, *writes])
            writes = {**writes, site: [(site, resume.Start(value)), *writes.get(site, [])]}
            skip = self._skipping_below(site.layer)
        reuse = self._reusing_prefix(prefix) if isinstance(prefix, PrefixCache) else contextlib.nullcontext()
        with reuse, skip, self._logits_only(last) if last is not None else contextlib.nullcontext():
            logits, acts = self._execute(batch, read, writes, grad=False)
        if last is not None:
            logits = resume.at_positions(logits, last, batch)
        return Run(logits, self._cache(acts, batch, read))

    def prefix_cache(self, inputs: Any, n: int) -> PrefixCache:
        """The unedited first ``n`` positions of ``inputs``, for ``run_with_interventions(prefix=...)``
        over these prompts (a backend that cannot reuse them keeps only the tokens and recomputes)."""
        from mechkit.models.prefix import distinct_prefixes

        batch = self.to_tokens(inputs)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= batch.shape[1]:
            raise MechkitError(f"a prefix cache holds 1 to {batch.shape[1]} positions of these prompts, not {n!r}")
        return PrefixCache(n, distinct_prefixes(batch.input_ids, n))

    @contextlib.contextmanager
    def _reusing_prefix(self, prefix: PrefixCache) -> Iterator[None]:
        """Run only the positions after ``prefix`` in the forward passes inside, on its keys and
        values (a backend that cannot, computes every position)."""
        yield

    @contextlib.contextmanager
    def _logits_only(self, positions: Tensor) -> Iterator[None]:
        """Compute logits only at ``positions`` (sorted absolute indices) during the forwards inside;
        a backend that cannot returns them all (the caller keeps the requested ones either way)."""
        yield

    @property
    def edited_sites(self) -> list[Site]:
        """Sites that the active ``intervene`` contexts and splices write to (every run applies them)."""
        sites = [site for group in self._context_writes for site in group]
        return list(dict.fromkeys([*sites, *(splice.host for splice in self._splices)]))

    @contextlib.contextmanager
    def _skipping_below(self, layer: int) -> Iterator[None]:
        """Skip blocks ``0 .. layer-1`` during the forward passes inside (a backend that cannot,
        computes them; the start write overrides their result either way)."""
        yield

    @contextlib.contextmanager
    def intervene(self, interventions: Mapping[str | Site, Any]) -> Iterator[Model]:
        """Apply interventions to every run of this model inside the block; removed on exit, always.

        Contexts nest and interleave freely; each is removed by identity when its block ends.
        """
        writes = self._writes(interventions)
        self._context_writes.append(writes)
        try:
            yield self
        finally:
            _remove_by_identity(self._context_writes, writes)

    @contextlib.contextmanager
    def splice(self, site: str | Site, module: Any, *, name: str | None = None,
               keep_error: bool = True) -> Iterator[Splice]:
        """Insert ``module`` at ``site`` for every run inside the block (see :mod:`mechkit.models.splice`).

        Its parts become sites ``<site>.<name>.<part>`` (e.g. ``blocks.3.resid_post.sae.latents``).
        ``name`` defaults to ``module.splice_name``, else ``"sae"`` for encode/decode modules and
        ``"splice"`` otherwise. Removed on exit, always.
        """
        host = self._splice_host(site)
        from mechkit.models.splice import is_sae_like, splice_parts

        name = name or getattr(module, "splice_name", None) or ("sae" if is_sae_like(module) else "splice")
        splice_parts(module)  # refuses modules that cannot be spliced, before anything is installed
        if any(s.host == host and s.name == name for s in self._splices):
            raise MechkitError(f"a module is already spliced at {host} as {name!r}; choose another name")
        entry = Splice(host, name, module, keep_error)
        Site(host.kind, host.layer, splice=f"{name}.in")  # validates the name
        self._splices.append(entry)
        try:
            yield entry
        finally:
            _remove_by_identity(self._splices, entry)

    def _splice_host(self, site: str | Site) -> Site:
        hosts = self.resolve(site)
        if len(hosts) != 1 or hosts[0].head is not None or hosts[0].expert is not None or hosts[0].splice:
            raise MechkitError(f"splice at exactly one whole site (e.g. 'blocks.3.resid_post'), got {site!r}")
        if (reason := self._writable(hosts[0])) is not None:
            raise SiteNotSupportedError(f"cannot splice at {hosts[0]}: {reason}")
        return hosts[0]

    def gradients(
        self,
        inputs: Any,
        sites: SiteSpec,
        metric: Callable[..., Tensor],
        *,
        interventions: Mapping[str | Site, Any] | None = None,
        metric_sites: SiteSpec | None = None,
    ) -> GradientResult:
        """d metric / d activation at ``sites`` (one forward, one backward; parameters get no .grad).

        ``metric(logits, batch)`` or ``metric(logits, cache, batch)`` returns a scalar; ``cache``
        holds ``sites`` and ``metric_sites`` with their graph, so a probe score or a mid-layer
        quantity can be the metric. Sum over examples for per-example gradients in one pass.
        """
        batch = self.to_tokens(inputs)
        read = self.resolve(sites)
        extra = [s for s in (self.resolve(metric_sites) if metric_sites is not None else []) if s not in read]
        logits, parts, acts = self._forward(batch, [*read, *extra], self._writes(interventions or {}), grad=True)

        def value_of(site: Site) -> Tensor:
            return parts[site] if site.splice is not None else narrow(acts[site.base], site)

        value = _scalar_metric(metric, logits, self._cache({s: value_of(s) for s in [*read, *extra]}, batch, []), batch)
        # differentiate w.r.t. whole tensors on the forward path, then narrow (a slice is not on the path)
        targets = list(dict.fromkeys(s if s.splice is not None else s.base for s in read))
        found = torch.autograd.grad(value, [parts[t] if t.splice else acts[t] for t in targets], allow_unused=True)
        wrt = {t: torch.zeros_like(parts[t] if t.splice else acts[t]) if g is None else g
               for t, g in zip(targets, found)}
        grads = {s: wrt[s] if s.splice is not None else narrow(wrt[s.base], s) for s in read}
        return GradientResult(
            value=value.detach(),
            logits=logits.detach(),
            activations=self._cache({s: value_of(s).detach() for s in read}, batch, read),
            grads=self._cache(grads, batch, read),
        )

    # -- internals ----------------------------------------------------------------------------
    def _writes(self, interventions: Mapping[str | Site, Any]) -> dict[Site, Items]:
        """Group interventions by base site; narrowed sites (heads/experts) become slice edits."""
        if not isinstance(interventions, Mapping):
            raise TypeError("interventions must be a mapping {site: intervention}")
        grouped: dict[Site, Items] = {}
        for spec, iv in interventions.items():
            for site in self.resolve(spec):
                if not callable(iv):
                    raise TypeError(f"intervention for {site} must be callable, got {type(iv).__name__}")
                if site.splice is None and (reason := self._writable(site.base)) is not None:
                    raise SiteNotSupportedError(f"cannot intervene on {site}: {reason}")
                grouped.setdefault(site.base, []).append((site, iv))
        return grouped

    def _execute(
        self, batch: Batch, read: Sequence[Site], writes: Mapping[Site, Items], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        """One forward pass; returns logits and ``{site: tensor}`` for every site in ``read``."""
        logits, parts, acts = self._forward(batch, read, writes, grad)
        return logits, {s: parts[s] if s.splice is not None else narrow(acts[s.base], s) for s in read}

    def _forward(
        self, batch: Batch, read: Sequence[Site], writes: Mapping[Site, Items], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor], dict[Site, Tensor]]:
        """Logits, splice-part values and whole (un-narrowed) site tensors of one forward pass."""
        self._check_tokens(batch)
        merged: dict[Site, Items] = {}
        for group in [*self._context_writes, writes]:
            for site, items in group.items():
                merged.setdefault(site, []).extend(items)
        part_reads = [s for s in read if s.splice is not None]
        edits = RunEdits(merged, list(self._splices), part_reads, RunContext(batch.attention_mask), grad)
        bases = list(dict.fromkeys(s.base for s in read if s.splice is None))
        with torch.set_grad_enabled(grad):
            logits, acts = self._run(batch, bases, edits.write_fns, grad)
        if not getattr(self, "remote_mode", False):  # remote edits run on the server, out of sight
            _check_fired(edits, [*bases, *part_reads], {**acts, **edits.parts})
        return logits, edits.parts, acts

    def _check_tokens(self, batch: Batch) -> None:
        ids, info = batch.input_ids, self.info
        if info.n_ctx is not None and batch.shape[1] > info.n_ctx:
            raise MechkitError(
                f"the input has {batch.shape[1]} tokens but {info.name} has a context of {info.n_ctx} positions; "
                "truncate or split the prompts"
            )
        if info.vocab_size is None or ids.is_floating_point() or ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= info.vocab_size:
            bad = low if low < 0 else high
            raise MechkitError(
                f"token id {bad} is outside the vocabulary of {info.name} (ids must be in 0–{info.vocab_size - 1}); "
                "were the ids made by another tokenizer?"
            )

    def _cache(self, acts: dict[Site, Tensor], batch: Batch, read: Sequence[Site]) -> ActivationCache:
        record = provenance(self, read, input_shape=list(batch.input_ids.shape))
        return ActivationCache(acts, record, batch.attention_mask)


def _check_fired(edits: RunEdits, bases: list[Site], acts: Mapping[Site, Tensor]) -> None:
    silent = edits.not_fired()
    if silent:
        raise MechkitError(
            f"intervention at {', '.join(map(str, silent))} never ran: the forward pass did not reach that site "
            "(a module: path that is not on the forward path, or a splice part the module did not tap)"
        )
    missing = [s for s in bases if s not in acts]
    if missing:
        raise MechkitError(f"sites {', '.join(map(str, missing))} did not fire during the forward pass")


def _scalar_metric(metric: Callable[..., Tensor], logits: Tensor, cache: ActivationCache, batch: Batch) -> Tensor:
    value = metric(logits, cache, batch) if _arity(metric) >= 3 else metric(logits, batch)
    if not isinstance(value, Tensor) or not value.requires_grad:
        raise MechkitError(
            "the metric must return a tensor computed from the logits or the cached sites "
            f"(got {type(value).__name__}{'' if not isinstance(value, Tensor) else ' without a graph'})"
        )
    if value.numel() != 1:
        raise MechkitError(
            f"the metric returned shape {tuple(value.shape)}; return a scalar — e.g. .sum() over the batch, "
            "which gives every example its own gradient in one pass"
        )
    if not bool(torch.isfinite(value).all()):
        raise MechkitError(f"the metric is {float(value)}; gradients of a non-finite value are meaningless")
    return value.reshape(())


def _arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 3
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _as_list(specs: Any) -> list[Any]:
    try:
        return list(specs)
    except TypeError:
        return [specs]  # a lone int or other non-site, reported by resolve


def _remove_by_identity(items: list, entry: Any) -> None:
    for i, item in enumerate(items):
        if item is entry:
            del items[i]
            return


__all__ = ["GradientResult", "Model", "ModelInfo", "Run", "SiteSpec", "WriteFn"]
