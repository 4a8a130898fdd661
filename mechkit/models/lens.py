"""TransformerLens backend: ``TransformerBridge`` (TL 3's HF-backed models) and ``HookedTransformer``.

Sites are read and written through TL's own hook points (``model.hooks(fwd_hooks=...)``; TL
removes the hooks it added in ``finally``, leaving hooks the caller attached alone). Site kinds
map to hook names as data (:mod:`mechkit.models.lens_hooks`, each mapping checked against the
reference backend in tests/equivalence/test_lens.py); at load one dummy forward checks every
mapped hook fires with the canonical shape.

Where TL's hook differs from mechkit's site, the site is either transformed exactly or refused:
- ``ln_final`` on a HookedTransformer: ``ln_final.hook_normalized`` precedes the norm's weights,
  so the site is read at ``unembed.hook_in`` (the norm's full output).
- BERT on the Bridge: TL's compatibility aliases ``hook_embed`` (token + position + type
  embeddings, LayerNorm), ``hook_resid_mid`` and ``hook_attn_out`` are other tensors; the Bridge's
  own ``embed.hook_out``, ``blocks.L.ln1.hook_out`` and ``blocks.L.attn.o.hook_out`` are the sites.
- ``attn.k`` / ``attn.v`` on a HookedTransformer with ``ungroup_grouped_query_attention``: the hook
  holds each KV head repeated per query head; the site keeps one copy per KV head and writes are
  repeated back (decided per run, since TL lets users toggle the flag after load).
- ``attn.in`` / ``mlp.in``: on the Bridge the attention / MLP norm's input hook (BERT: the
  self-attention's and the intermediate layer's input), each routed as the module's own copy. On a
  HookedTransformer ``hook_attn_in`` (one copy of resid_pre per head: the site is one copy, a
  write goes to every head) and ``hook_mlp_in``, which exist only with ``cfg.use_attn_in`` /
  ``cfg.use_hook_mlp_in`` (otherwise unavailable, naming the setter to call).
- ``resid_mid`` on the Bridge for pre-LN decoders: the alias is the MLP norm's input, which the HF
  block also adds to the MLP output; a write is also added (new − old) to ``resid_post``, as in
  the reference backend.

Sites this backend does not express (``SiteNotSupportedError``, reasons below):
- ``blocks.L.moe.topk``: ``TOPK_REASON``.
- ``blocks.L.mlp.pre`` / ``mlp.post`` on MoE layers: ``MOE_MLP_REASON`` (the reference backend has
  no such site there either).
- ``ln_final`` on BERT: ``UNSUPPORTED["bert"]``.
- ``module:<path>``: ``MODULE_REASON``.
- ``attn.q_in`` / ``k_in`` / ``v_in``: ``HEAD_INPUT_REASON``.
- any kind for which the wrapped model has no hook point (e.g. MoE routers on a HookedTransformer):
  "no TransformerLens hook point provides it".

Sites that can be read but not written (``SiteNotSupportedError`` on intervention):
- ``moe.router``: ``ROUTER_READONLY``.
- ``attn.pattern`` wherever a write to TL's ``hook_pattern`` does not reach the attention output
  (checked at load by a second dummy forward that zeroes every pattern; BERT on the Bridge):
  ``PATTERN_READONLY``. Elsewhere pattern writes take effect (z = edited pattern @ v).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError, SiteNotSupportedError, UnsupportedArchitectureError
from mechkit.models.base import Model, ModelInfo, WriteFn
from mechkit.models.execution import skipped
from mechkit.models.hf_forward import fingerprint
from mechkit.models.inputs import Batch
from mechkit.models.lens_boot import bridge_unembed, flavour_of, folder_tokenizer, model_type_of, n_ctx_of, tl_version
from mechkit.models.lens_hooks import (
    GQA_ATTN_IN_REASON,
    HEAD_INPUT_REASON,
    HOOKS,
    HT_FLAGS,
    HT_TRANSFORMS,
    MODULE_REASON,
    MOE_MLP_REASON,
    OVERRIDES,
    PATTERN_READONLY,
    ROUTER_READONLY,
    TOPK_REASON,
    TRANSFORMS,
    UNSUPPORTED,
    flag_reason,
)
from mechkit.models.lens_weights import (
    hooked_transformer_from_gpt2,
    hooked_transformer_from_hf,
    hooked_transformer_from_llama,
)
from mechkit.models.taps import RunShape, RunState, Tap, apply_entries, get, group_entries
from mechkit.models.verify import expected_shape
from mechkit.sites import BLOCK_KINDS, GLOBAL_KINDS, Site

GQA_KINDS = ("attn.k", "attn.v", "attn.rot_k")
_DUMMY = (2, 5)


class LensModel(Model):
    """Wrap a TransformerLens ``TransformerBridge`` or ``HookedTransformer``."""

    backend = "lens"

    def __init__(self, tl_model: Any, tokenizer: Any = None, *, name: str | None = None) -> None:
        self.tl = tl_model
        self._logits_to_keep: Tensor | None = None
        self.flavour = flavour_of(tl_model)
        self.model_type = model_type_of(tl_model) if self.flavour == "bridge" else "hooked_transformer"
        cfg = tl_model.cfg
        info = ModelInfo(
            name=name or getattr(cfg, "model_name", None) or type(tl_model).__name__,
            architecture=f"lens:{self.model_type}",
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=getattr(cfg, "d_mlp", None),
            vocab_size=cfg.d_vocab,
            n_experts=getattr(cfg, "num_experts", None),
            top_k=getattr(cfg, "experts_per_token", None),
            encoder=self.model_type == "bert",
            n_ctx=n_ctx_of(tl_model, self.flavour, self.model_type),
        )
        super().__init__(info, tokenizer if tokenizer is not None else getattr(tl_model, "tokenizer", None))
        self.hook_names: dict[Site, str] = {}  # site -> TL hook name
        self.taps: dict[Site, Tap] = {}
        self.readonly: dict[Site, str] = {}
        self.unavailable: dict[str, str] = {
            **UNSUPPORTED.get(self.model_type, {}),
            "moe.topk": TOPK_REASON,
            **dict.fromkeys(("attn.q_in", "attn.k_in", "attn.v_in"), HEAD_INPUT_REASON),
        }
        self._map_hooks()

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any = None, *, name: str | None = None) -> LensModel:
        """Boot a ``TransformerBridge`` over an in-memory HF model (never fetches from a hub).

        The Bridge rewires the modules it is given, so it receives a copy: the caller's model is
        left exactly as it was. The adapter is chosen by the model's class, not by
        ``config.architectures`` (which may name another head).
        """
        from transformer_lens.model_bridge import TransformerBridge

        model = copy.deepcopy(hf_model)
        model.config.architectures = [type(model).__name__]
        tok = folder_tokenizer(tokenizer)
        try:
            bridge = TransformerBridge.boot_transformers(type(model).__name__, hf_model=model, tokenizer=tok)
        except (ValueError, AttributeError, KeyError, TypeError) as exc:  # TL's adapter does not fit the model
            raise UnsupportedArchitectureError(
                f"TransformerLens {tl_version()} cannot build a TransformerBridge for {type(model).__name__} "
                f"({type(exc).__name__}: {exc}). Its adapters expect the HF class with a language-model head "
                f"(e.g. *ForCausalLM, BertForMaskedLM); otherwise use backend='torch_hooks' or 'nnsight'."
            ) from exc
        return cls(bridge, tokenizer, name=name or getattr(hf_model.config, "_name_or_path", None) or None)

    # -- Model interface --------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return sorted(self.taps, key=Site.sort_key)

    def _unsupported_reason(self, site: Site) -> str | None:
        if site.kind == "module":
            return MODULE_REASON
        if site.kind in ("mlp.pre", "mlp.post") and site.layer in self.info.moe_layers:
            return MOE_MLP_REASON
        return self.unavailable.get(site.kind)

    def _writable(self, site: Site) -> str | None:
        if site.kind == "module":
            return MODULE_REASON
        return self.readonly.get(site)

    @property
    def torch_module(self) -> nn.Module:
        return self.tl

    def parameters_fingerprint(self) -> str:
        return fingerprint(self.tl)

    def resolve(self, specs: Any) -> list[Site]:
        names = [specs] if isinstance(specs, (str, Site)) else list(specs)
        for spec in names:
            if str(spec).startswith("module:"):
                raise SiteNotSupportedError(f"{spec} is not available with the lens backend: {MODULE_REASON}")
        return super().resolve(specs)

    def unembed(self, resid: Tensor) -> Tensor:
        """Logit lens with the model's own final norm and unembedding (no hooks added, no grad)."""
        with torch.no_grad():
            if self.flavour == "hooked_transformer":
                return self.tl.unembed(self.tl.ln_final(resid))
            return bridge_unembed(self.tl, self.model_type, resid)

    # -- the primitive ----------------------------------------------------------------------------
    def _run(
        self, batch: Batch, read: Sequence[Site], write: Mapping[Site, WriteFn], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        shape = self._shape(*batch.shape)
        state = RunState(shape, grad)
        sites = list(dict.fromkeys([*write, *read]))
        groups = group_entries(sites, dict(write), set(read), self._locate)
        fwd_hooks = [(name, _hook(entries, state)) for (name, _), entries in groups.items()]
        was_training = self.tl.training
        self.tl.eval()
        try:
            # the LM head only at the kept positions, unless a hook at the final norm needs them all
            keep = None if any(s.kind in ("ln_final", "logits") for s in sites) else self._logits_to_keep
            with self.tl.hooks(fwd_hooks=fwd_hooks):
                logits = self._call(batch) if keep is None else self._last_logits(batch, keep)
        finally:
            self.tl.train(was_training)
        return logits, state.store

    @contextlib.contextmanager
    def _skipping_below(self, layer: int) -> Iterator[None]:
        # a HookedTransformer block maps resid_pre to resid_post; a Bridge block is HF's, wrapped
        blocks = list(self.tl.blocks)[:layer] if self.flavour == "hooked_transformer" else []
        with skipped(blocks):
            yield

    @contextlib.contextmanager
    def _logits_only(self, positions: Tensor) -> Iterator[None]:
        self._logits_to_keep = positions if self.flavour == "hooked_transformer" else None
        try:
            yield
        finally:
            self._logits_to_keep = None

    def _last_logits(self, batch: Batch, keep: Tensor) -> Tensor:
        resid = self.tl(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=self.tl.cfg.n_layers)
        return self.tl.unembed(self.tl.ln_final(resid[:, keep.to(resid.device)]))

    def _locate(self, site: Site) -> tuple[str, Tap]:
        """The hook point serving a site (aliases resolved, so one hook handles all its sites)."""
        name = self.hook_names[site]
        point = self.tl.hook_dict[name].name
        return (point if point in self.tl.hook_dict else name), self.taps[site]

    def _call(self, batch: Batch) -> Tensor:
        return self.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")

    def _shape(self, batch: int, seq: int) -> RunShape:
        i = self.info
        return RunShape(batch, seq, i.n_heads, i.n_kv_heads, i.d_head, i.top_k, i.n_experts)

    # -- mapping kinds to hook points, verified by dummy forwards ---------------------------------
    def _map_hooks(self) -> None:
        candidates = self._candidates()
        seen = self._dummy_forward(set(candidates.values()))
        moe_layers = []
        for site, name in candidates.items():
            value = seen.get(name)
            if value is None:
                continue
            if site.kind == "moe.router":  # dense gated MLPs also have an mlp.gate: keep router-shaped ones
                if self.info.n_experts is None or tuple(value.shape) != (_DUMMY[0] * _DUMMY[1], self.info.n_experts):
                    continue
                moe_layers.append(site.layer)
                self.readonly[site] = ROUTER_READONLY
            self.hook_names[site] = name
            self.taps[site] = Tap(name, transform=self._transforms.get(site.kind, "identity"))
        if moe_layers:
            self.info = replace(self.info, moe_layers=tuple(sorted(moe_layers)))
        else:
            self.info = replace(self.info, n_experts=None, top_k=None)
        self._check_shapes(seen)
        self._check_pattern_writes()
        self._route_resid_mid_skips()
        for kind in set(GLOBAL_KINDS) | set(BLOCK_KINDS):
            if not any(s.kind == kind for s in self.taps):
                self.unavailable.setdefault(kind, f"no TransformerLens hook point provides it for {self.model_type}")

    @property
    def _transforms(self) -> dict[str, str]:
        return {**TRANSFORMS, **(HT_TRANSFORMS if self.flavour == "hooked_transformer" else {})}

    def _candidates(self) -> dict[Site, str]:
        """Hook names per site that this model has (flag-gated HookedTransformer hooks only when on)."""
        if self.flavour == "hooked_transformer":
            if getattr(self.tl.cfg, "n_key_value_heads", None):
                self.unavailable.setdefault("attn.in", GQA_ATTN_IN_REASON)
            for kind, (flag, _) in HT_FLAGS.items():
                if not getattr(self.tl.cfg, flag, False):
                    self.unavailable.setdefault(kind, flag_reason(kind))
        candidates: dict[Site, str] = {}
        for kind, template in {**HOOKS, **OVERRIDES.get(self.model_type, {})}.items():
            if kind in self.unavailable:
                continue
            for layer in [None] if kind in GLOBAL_KINDS else range(self.info.n_layers):
                name = template.replace("{L}", str(layer))
                if name in self.tl.hook_dict:
                    candidates[Site(kind, layer)] = name
        return candidates

    def _route_resid_mid_skips(self) -> None:
        """A Bridge's resid_mid is the MLP norm's input, also the HF block's skip: writes reach resid_post too."""
        for site, name in self.hook_names.items():
            mlp_norm_input = (self.tl.hook_dict[name].name or "").endswith(".ln2.hook_in")
            if site.kind == "resid_mid" and mlp_norm_input and Site("resid_post", site.layer) in self.taps:
                self.taps[site] = replace(self.taps[site], skip="resid_post")

    def _dummy_forward(self, names: set[str], extra: Sequence[tuple[str, Any]] = ()) -> dict[str, Tensor]:
        ids = torch.arange(_DUMMY[0] * _DUMMY[1]).reshape(_DUMMY) % max(self.info.vocab_size or 2, 2)
        seen: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(act: Tensor, hook: Any) -> None:
                seen[name] = act.detach().clone()

            return hook

        was_training = self.tl.training
        self.tl.eval()
        try:
            with torch.no_grad(), self.tl.hooks(fwd_hooks=[*extra, *((n, keep(n)) for n in sorted(names))]):
                self._call(Batch(ids, torch.ones_like(ids)))
        finally:
            self.tl.train(was_training)
        return seen

    def _check_shapes(self, seen: dict[str, Tensor]) -> None:
        shape = self._shape(*_DUMMY)
        problems = []
        for site, tap in list(self.taps.items()):
            if site.kind in ("mlp.pre", "mlp.post") and site.layer in self.info.moe_layers:
                del self.taps[site], self.hook_names[site]
                continue
            value = _as_site(site, seen[tap.module], shape)
            want = expected_shape(site, self.info, *_DUMMY)
            if want is not None and tuple(get(tap, value, shape).shape) != want:
                problems.append(f"{site} ({tap.module}) has shape {tuple(value.shape)}, expected {want}")
        if problems:
            raise MechkitError("TransformerLens hooks do not match mechkit's sites:\n  " + "\n  ".join(problems))

    def _check_pattern_writes(self) -> None:
        """Zero every pattern: a layer whose z is not then exactly zero ignores hook_pattern writes."""
        pairs = {s.layer: (name, self.hook_names.get(Site("attn.z", s.layer))) for s, name in self.hook_names.items()
                 if s.kind == "attn.pattern"}
        if not pairs:
            return
        zeroed = [(p, lambda act, hook: torch.zeros_like(act)) for p, _ in pairs.values()]
        edited = self._dummy_forward({z for _, z in pairs.values() if z}, extra=zeroed)
        for layer, (_, z) in pairs.items():
            if z is None or torch.count_nonzero(edited[z]) > 0:
                self.readonly[Site("attn.pattern", layer)] = PATTERN_READONLY


def _hook(entries: list, state: RunState):
    """A TL forward hook running mechkit's per-site steps on one hook point's value."""

    def hook(act: Tensor, hook: Any) -> Tensor | None:
        group = _kv_group(entries[0][0], act, state.shape)
        raw = act[:, :, ::group] if group > 1 else act
        new, changed = apply_entries(entries, raw, state)
        if not changed:
            return None
        return new.repeat_interleave(group, dim=2) if group > 1 else new

    return hook


def _kv_group(site: Site, act: Tensor, shape: RunShape) -> int:
    """How many times each KV head is repeated in a HookedTransformer's ungrouped k/v hook (else 1)."""
    if site.kind in GQA_KINDS and shape.n_kv_heads < shape.n_heads and act.ndim == 4 and act.shape[2] == shape.n_heads:
        return shape.n_heads // shape.n_kv_heads
    return 1


def _as_site(site: Site, act: Tensor, shape: RunShape) -> Tensor:
    group = _kv_group(site, act, shape)
    return act[:, :, ::group] if group > 1 else act


__all__ = ["LensModel", "hooked_transformer_from_gpt2", "hooked_transformer_from_hf", "hooked_transformer_from_llama"]

