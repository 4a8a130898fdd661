"""The load-time check of a site table: one dummy forward in which every declared site must fire
with its declared shape.

Sites every block has are required (a miss is an error naming the table). Optional sites are
dropped with a reason when the model cannot serve them: ``attn.pattern`` needs eager attention
and mechkit's attention function must reproduce it exactly (logits compared with a plain
forward); per-head q/k/v inputs need a plain linear projection whose per-head recomputation
matches its output.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mechkit.errors import MechkitError
from mechkit.models import attention, projections
from mechkit.models.base import ModelInfo
from mechkit.models.hf_forward import logits_of
from mechkit.models.taps import RunShape, Tap, get
from mechkit.sites import BLOCK_KINDS, GLOBAL_KINDS, Site

if TYPE_CHECKING:
    from mechkit.models.sitemap import SiteMap

_BATCH, _SEQ = 2, 5
EAGER_REASON = (
    "attention weights are only computed by eager attention; load with attn_implementation='eager' "
    "(mechkit.load does) or call model.set_attn_implementation('eager')"
)
NO_EAGER_FUNCTION = "this model's attention module has no eager_attention_forward for mechkit's attention function"
NOT_REPRODUCED = (
    "mechkit's eager-equivalent attention function does not reproduce this model's eager attention "
    "(e.g. GPT-2 with reorder_and_upcast_attn=True)"
)
NOT_LINEAR = "the q/k/v projection is not a plain linear layer whose per-head outputs mechkit can recompute"
HEAD_INPUT_KINDS = ("attn.q_in", "attn.k_in", "attn.v_in")


def expected_shape(site: Site, info: ModelInfo, batch: int, seq: int) -> tuple[int, ...] | None:
    d, h, kv, dh = info.d_model, info.n_heads, info.n_kv_heads, info.d_head
    shapes = {
        "attn.q_in": (batch, seq, h, d),
        "attn.k_in": (batch, seq, kv, d),
        "attn.v_in": (batch, seq, kv, d),
        "attn.q": (batch, seq, h, dh),
        "attn.k": (batch, seq, kv, dh),
        "attn.v": (batch, seq, kv, dh),
        "attn.rot_q": (batch, seq, h, dh),
        "attn.rot_k": (batch, seq, kv, dh),
        "attn.z": (batch, seq, h, dh),
        "attn.pattern": (batch, h, seq, seq),
        "moe.router": (batch, seq, info.n_experts),
        "moe.topk": (batch, seq, info.n_experts),
        "logits": (batch, seq, info.vocab_size),
        "mlp.pre": None,  # MoE models' dense layers may use another width
        "mlp.post": None,
    }
    return shapes.get(site.kind, (batch, seq, d))


def verify(model: nn.Module, sitemap: SiteMap) -> None:
    """Run the dummy forward, drop optional sites the model cannot serve, record the firing order."""
    shape = sitemap.run_shape(_BATCH, _SEQ)
    seen: dict[Site, Any] = {}
    order: list[Site] = []
    edits, dropped = _attention_probes(model, sitemap, seen)
    ids = torch.arange(_BATCH * _SEQ).reshape(_BATCH, _SEQ) % max(sitemap.info.vocab_size or 2, 1)
    reference = _dummy_forward(model, ids) if edits else None
    handles = _install(model, sitemap, shape, seen, order)
    try:
        with attention.editable_patterns(model, edits) if edits else contextlib.nullcontext():
            logits = _dummy_forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    if reference is not None and not reference.is_meta and not torch.equal(reference, logits):
        dropped.update(dict.fromkeys(_attention_sites(sitemap), NOT_REPRODUCED))
    _check_seen(sitemap, seen, order, dropped)


def _attention_sites(sitemap: SiteMap) -> list[Site]:
    return [s for s, tap in sitemap.taps.items() if tap.in_attention]


def _attention_probes(model: nn.Module, sitemap: SiteMap, seen: dict) -> tuple[dict, dict[Site, str]]:
    """Edits that record each pattern, query and key as mechkit's attention function sees them
    (or why they cannot)."""
    sites = _attention_sites(sitemap)
    if not sites:
        return {}, {}
    modules = {site: model.get_submodule(sitemap.module_paths[site]) for site in sites}
    if not attention.is_eager(model):
        return {}, dict.fromkeys(sites, EAGER_REASON)
    if not all(attention.has_eager_function(m) for m in modules.values()):
        return {}, dict.fromkeys(sites, NO_EAGER_FUNCTION)

    def probe(site: Site):
        def edit(x: torch.Tensor) -> torch.Tensor:
            seen[site] = x
            return x

        return edit

    edits: dict[nn.Module, attention.AttentionEdits] = {}
    for site, module in modules.items():
        edits.setdefault(module, attention.AttentionEdits()).put(sitemap.taps[site].side, probe(site))
    return edits, {}


def _dummy_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return logits_of(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    finally:
        model.train(was_training)


def _install(model: nn.Module, sitemap: SiteMap, shape: RunShape, seen: dict, order: list) -> list:
    """One recording hook per (module, hook side); patterns are recorded when their module returns."""
    groups: dict[tuple[str, str], list[Site]] = {}
    for site, path in sitemap.module_paths.items():
        side = "output" if sitemap.taps[site].in_attention else sitemap.taps[site].hook_side
        groups.setdefault((path, side), []).append(site)

    def make_hook(sites: list[Site]):
        def hook(module, args, kwargs, *output):
            for site in sites:
                if site not in order:
                    order.append(site)
                if not sitemap.taps[site].in_attention:
                    seen[site] = _probe(sitemap.taps[site], module, args, kwargs, output, shape)

        return hook

    handles = []
    for (path, side), sites in groups.items():
        module = model.get_submodule(path)
        if side == "input":
            handles.append(module.register_forward_pre_hook(make_hook(sites), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(make_hook(sites), with_kwargs=True))
    return handles


def _probe(tap: Tap, module: nn.Module, args: tuple, kwargs: dict, output: tuple, shape: RunShape) -> Any:
    """The site value a tap gives at this hook (or the exception that says why not)."""
    x = args[0] if args else kwargs.get("hidden_states")
    try:
        if tap.side == "input":
            return get(tap, x, shape)
        if tap.side == "output":
            return get(tap, output[0], shape)
        copies = projections.head_copies(x, projections.n_heads_of(tap, shape))
        heads = projections.project_heads(module, tap, copies, shape)
        actual = get(projections.output_tap(tap), output[0], shape)
        if not actual.is_meta and not _close_in_dtype(heads, actual):
            raise ValueError("per-head recomputation differs from the projection's output")
        return copies
    except (TypeError, IndexError, RuntimeError, ValueError) as exc:
        return exc


def _close_in_dtype(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to summation order: a few units of the dtype's precision at the tensors' scale."""
    scale = b.abs().max().clamp_min(1.0)
    return bool((a - b).abs().max() <= 16 * torch.finfo(b.dtype).eps * scale)


def _problem(sitemap: SiteMap, site: Site, seen: dict[Site, Any]) -> str | None:
    """What is wrong with a site after the dummy forward (None when it fired with its shape)."""
    if site not in seen:
        return f"{site} ({sitemap.module_paths[site]}) did not fire"
    value = seen[site]
    if not isinstance(value, torch.Tensor):
        return f"{site} ({sitemap.module_paths[site]}) gave {value!r}"
    want = expected_shape(site, sitemap.info, _BATCH, _SEQ)
    if want is not None and tuple(value.shape) != want:
        return f"{site} has shape {tuple(value.shape)}, expected {want}"
    return None


def _check_seen(sitemap: SiteMap, seen: dict[Site, Any], order: list[Site], dropped: dict[Site, str]) -> None:
    problems = []
    for site in list(sitemap.taps):
        problem = _problem(sitemap, site, seen)
        if site.kind in HEAD_INPUT_KINDS and problem is not None:
            dropped.setdefault(site, f"{NOT_LINEAR} ({problem})")
        if site in dropped:
            sitemap.unavailable.setdefault(site.kind, dropped[site])
            del sitemap.taps[site], sitemap.module_paths[site]
        elif problem is not None:
            problems.append(problem)
    if problems:
        raise MechkitError(f"the {sitemap.table.name} site table does not fit this model:\n  " + "\n  ".join(problems))
    sitemap.order = [s for s in order if s in sitemap.taps]
    for kind in (set(GLOBAL_KINDS) | set(BLOCK_KINDS)) - {s.kind for s in sitemap.taps}:
        sitemap.unavailable.setdefault(kind, f"no {sitemap.table.name} module provides it")
