"""TransformerLens backend: ``TransformerBridge`` (TL 3's HF-backed models) and ``HookedTransformer``.

Sites are read and written through TL's own hook points (``model.hooks(fwd_hooks=...)``; TL
removes the hooks it added in ``finally``, leaving hooks the caller attached alone). Site kinds
map to hook names as data (``HOOKS`` plus ``OVERRIDES`` per flavour / architecture, each checked
against the reference backend in tests/equivalence/test_lens.py); at load one dummy forward
checks every mapped hook fires with the canonical shape.

Where TL's hook differs from mechkit's site, the site is either transformed exactly or refused:
- ``ln_final`` on a HookedTransformer: ``ln_final.hook_normalized`` precedes the norm's weights,
  so the site is read at ``unembed.hook_in`` (the norm's full output).
- BERT on the Bridge: TL's compatibility aliases ``hook_embed`` (token + position + type
  embeddings, LayerNorm), ``hook_resid_mid`` and ``hook_attn_out`` are other tensors; the Bridge's
  own ``embed.hook_out``, ``blocks.L.ln1.hook_out`` and ``blocks.L.attn.o.hook_out`` are the sites.
- ``attn.k`` / ``attn.v`` on a HookedTransformer with ``ungroup_grouped_query_attention``: the hook
  holds each KV head repeated per query head; the site keeps one copy per KV head and writes are
  repeated back (decided per run, since TL lets users toggle the flag after load).

Sites this backend does not express (``SiteNotSupportedError``, reasons below):
- ``blocks.L.moe.topk``: ``TOPK_REASON``.
- ``blocks.L.mlp.pre`` / ``mlp.post`` on MoE layers: ``MOE_MLP_REASON`` (the reference backend has
  no such site there either).
- ``ln_final`` on BERT: ``UNSUPPORTED["bert"]``.
- ``module:<path>``: ``MODULE_REASON``.
- any kind for which the wrapped model has no hook point (e.g. MoE routers on a HookedTransformer):
  "no TransformerLens hook point provides it".

Sites that can be read but not written (``SiteNotSupportedError`` on intervention):
- ``moe.router``: ``ROUTER_READONLY``.
- ``attn.pattern`` wherever a write to TL's ``hook_pattern`` does not reach the attention output
  (checked at load by a second dummy forward that zeroes every pattern; BERT on the Bridge):
  ``PATTERN_READONLY``. Elsewhere pattern writes take effect (z = edited pattern @ v).
- ``resid_mid`` on the Bridge for pre-LN decoders: ``RESID_MID_READONLY`` (the alias is the MLP
  norm's input; the HF block adds the unedited value to the MLP output). HookedTransformer's
  ``hook_resid_mid`` is the residual stream itself and is writable.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError, SiteNotSupportedError, UnsupportedArchitectureError
from mechkit.models.base import Model, ModelInfo, WriteFn
from mechkit.models.hf_forward import fingerprint
from mechkit.models.inputs import Batch
from mechkit.models.lens_weights import (
    hooked_transformer_from_gpt2,
    hooked_transformer_from_hf,
    hooked_transformer_from_llama,
)
from mechkit.models.sitemap import expected_shape
from mechkit.models.taps import RunShape, Tap, apply_entries, get
from mechkit.sites import BLOCK_KINDS, GLOBAL_KINDS, Site

HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn.q": "blocks.{L}.attn.hook_q",
    "attn.k": "blocks.{L}.attn.hook_k",
    "attn.v": "blocks.{L}.attn.hook_v",
    "attn.z": "blocks.{L}.attn.hook_z",
    "attn.pattern": "blocks.{L}.attn.hook_pattern",
    "attn.out": "blocks.{L}.hook_attn_out",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "moe.router": "blocks.{L}.mlp.gate.hook_out",
    "mlp.pre": "blocks.{L}.mlp.hook_pre",
    "mlp.post": "blocks.{L}.mlp.hook_post",
    "mlp.out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
    "ln_final": "ln_final.hook_out",
    "logits": "unembed.hook_out",
}
# flavour ("hooked_transformer") or HF model_type (Bridge) -> kind -> hook name
OVERRIDES: dict[str, dict[str, str]] = {
    "hooked_transformer": {"ln_final": "unembed.hook_in"},
    "bert": {
        "embed": "embed.hook_out",
        "resid_mid": "blocks.{L}.ln1.hook_out",
        "attn.out": "blocks.{L}.attn.o.hook_out",
    },
}
UNSUPPORTED: dict[str, dict[str, str]] = {
    "bert": {"ln_final": "BERT has no final LayerNorm (TL's ln_final is the MLM head's transform LayerNorm)"},
}
TOPK_REASON = (
    "TransformerLens hooks the router logits (mlp.gate.hook_out) but not the experts the router chose "
    "or their weights; recomputing them from logits is wrong for routers with biases or group limits"
)
MOE_MLP_REASON = "on MoE layers TL's mlp.hook_pre/hook_post are the MoE block's input/output, not neurons"
MODULE_REASON = "TransformerLens addresses hook points, not arbitrary submodules; use the torch_hooks backend"
ROUTER_READONLY = "TL hooks the router logits after the router has chosen; editing them changes no routing"
PATTERN_READONLY = "a write to TL's hook_pattern does not reach the attention output for this architecture"
RESID_MID_READONLY = (
    "TL's hook_resid_mid here is the input of the MLP's norm (blocks.L.ln2.hook_in): an edit would reach the "
    "MLP but not the residual skip inside the HF block; write blocks.L.attn.out instead"
)
GQA_KINDS = ("attn.k", "attn.v")
_DUMMY = (2, 5)


class LensModel(Model):
    """Wrap a TransformerLens ``TransformerBridge`` or ``HookedTransformer``."""

    backend = "lens"

    def __init__(self, tl_model: Any, tokenizer: Any = None, *, name: str | None = None) -> None:
        self.tl = tl_model
        self.flavour = _flavour(tl_model)
        self.model_type = _model_type(tl_model) if self.flavour == "bridge" else "hooked_transformer"
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
        )
        super().__init__(info, tokenizer if tokenizer is not None else getattr(tl_model, "tokenizer", None))
        self.hook_names: dict[Site, str] = {}  # site -> TL hook name
        self.taps: dict[Site, Tap] = {}
        self.readonly: dict[Site, str] = {}
        self.unavailable: dict[str, str] = {**UNSUPPORTED.get(self.model_type, {}), "moe.topk": TOPK_REASON}
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
        tok = _folder_tokenizer(tokenizer)
        try:
            bridge = TransformerBridge.boot_transformers(type(model).__name__, hf_model=model, tokenizer=tok)
        except (ValueError, AttributeError, KeyError, TypeError) as exc:  # TL's adapter does not fit the model
            raise UnsupportedArchitectureError(
                f"TransformerLens {_tl_version()} cannot build a TransformerBridge for {type(model).__name__} "
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
            return _bridge_unembed(self.tl, self.model_type, resid)

    # -- the primitive ----------------------------------------------------------------------------
    def _run(
        self, batch: Batch, read: Sequence[Site], write: Mapping[Site, WriteFn], grad: bool
    ) -> tuple[Tensor, dict[Site, Tensor]]:
        shape = self._shape(*batch.shape)
        plan = [(site, self.taps[site], write.get(site), site in read) for site in dict.fromkeys([*write, *read])]
        store: dict[Site, Tensor] = {}
        fwd_hooks = [(name, _hook(entries, shape, grad, store)) for name, entries in self._by_hook_point(plan)]
        was_training = self.tl.training
        self.tl.eval()
        try:
            with self.tl.hooks(fwd_hooks=fwd_hooks):
                logits = self._forward(batch)
        finally:
            self.tl.train(was_training)
        return logits, store

    def _by_hook_point(self, plan: list) -> list[tuple[str, list]]:
        """One hook per TL hook point (aliases resolved), its sites in execution order."""
        points: dict[int, tuple[str, list]] = {}
        for entry in sorted(plan, key=lambda e: e[0].sort_key()):
            name = self.hook_names[entry[0]]
            points.setdefault(id(self.tl.hook_dict[name]), (name, []))[1].append(entry)
        return list(points.values())

    def _forward(self, batch: Batch) -> Tensor:
        return self.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")

    def _shape(self, batch: int, seq: int) -> RunShape:
        i = self.info
        return RunShape(batch, seq, i.n_heads, i.n_kv_heads, i.d_head, i.top_k, i.n_experts)

    # -- mapping kinds to hook points, verified by dummy forwards ---------------------------------
    def _map_hooks(self) -> None:
        overrides = OVERRIDES.get(self.model_type, {})
        candidates: dict[Site, str] = {}
        for kind, template in {**HOOKS, **overrides}.items():
            if kind in self.unavailable:
                continue
            for layer in [None] if kind in GLOBAL_KINDS else range(self.info.n_layers):
                name = template.replace("{L}", str(layer))
                if name in self.tl.hook_dict:
                    candidates[Site(kind, layer)] = name
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
            self.taps[site] = Tap(name, transform="tokens") if site.kind == "moe.router" else Tap(name)
        if moe_layers:
            self.info = replace(self.info, moe_layers=tuple(sorted(moe_layers)))
        else:
            self.info = replace(self.info, n_experts=None, top_k=None)
        self._check_shapes(seen)
        self._check_pattern_writes()
        for site, name in self.hook_names.items():
            if site.kind == "resid_mid" and (self.tl.hook_dict[name].name or "").endswith(".ln2.hook_in"):
                self.readonly[site] = RESID_MID_READONLY
        for kind in set(GLOBAL_KINDS) | set(BLOCK_KINDS):
            if not any(s.kind == kind for s in self.taps):
                self.unavailable.setdefault(kind, f"no TransformerLens hook point provides it for {self.model_type}")

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
                self._forward(Batch(ids, torch.ones_like(ids)))
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


def _hook(entries: list, shape: RunShape, grad: bool, store: dict[Site, Tensor]):
    """A TL forward hook running mechkit's per-site steps on one hook point's value."""

    def hook(act: Tensor, hook: Any) -> Tensor | None:
        group = _kv_group(entries[0][0], act, shape)
        raw = act[:, :, ::group] if group > 1 else act
        new, changed = apply_entries(entries, raw, shape, grad, store)
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


def _bridge_unembed(bridge: Any, model_type: str, resid: Tensor) -> Tensor:
    """Final norm + unembedding of the HF model under a Bridge (BERT: its whole MLM head)."""
    from mechkit.models.arch import table_for

    hf = bridge.original_model
    try:
        taps = table_for(model_type, type(hf).__name__).taps
    except UnsupportedArchitectureError:
        if model_type == "bert":
            raise
        return bridge.unembed(bridge.ln_final(resid))
    x = hf.get_submodule(taps["ln_final"].module)(resid) if "ln_final" in taps else resid
    return hf.get_submodule(taps["logits"].module)(x)


def _flavour(tl_model: Any) -> str:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(tl_model, TransformerBridge):
        return "bridge"
    if isinstance(tl_model, HookedTransformer):
        return "hooked_transformer"
    raise UnsupportedArchitectureError(
        f"the lens backend wraps a TransformerBridge or a HookedTransformer, not {type(tl_model).__name__}; "
        f"for encoders boot a Bridge over the HF model (LensModel.from_hf(BertForMaskedLM))"
    )


def _model_type(bridge: Any) -> str:
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    return getattr(config, "model_type", "unknown")


def _tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "(unknown version)"


def _folder_tokenizer(tokenizer: Any) -> Any:
    """TL's Bridge needs a tokenizer loaded from a folder; round-trip an in-memory one (or make one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is not None and getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    if tokenizer is None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
        )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


__all__ = ["LensModel", "hooked_transformer_from_gpt2", "hooked_transformer_from_hf", "hooked_transformer_from_llama"]
