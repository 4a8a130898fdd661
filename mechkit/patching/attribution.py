"""Attribution patching (AtP), its AtP* corrections and RelP: every node's patching effect at once.

Patching node ``a`` from the *source* run into the *base* run changes the metric by, to first order,
``(a_source − a_base) · ∂m/∂a`` with the gradient taken on the base run. One forward + backward of
the base run (``model.gradients`` of the per-prompt metric summed over prompts, so each prompt gets
its own gradient) and one forward of the source run give this for every node:

- ``direction="noise"`` (default): base = clean run, source = corrupt — the setting of Nanda's AtP
  and of Kramár et al. 2024 (gradient on the clean run, where the circuit is active);
  ``direction="denoise"``: base = corrupt run, source = clean. Linearising around the corrupt run
  is much worse on real models (SmolLM2 IOI, 8 prompts, resid_pre × position: Pearson 0.54 against
  exact denoising, 0.78 against exact noising), so prefer comparing with noising activation patching.
- A node is a head at one position (``attn.z`` / ``q`` / ``k`` / ``v``: the product summed over
  ``d_head``), a neuron at one position (``mlp.post``), or a layer output at one position
  (``resid_pre`` / ``resid_post`` / ``attn.out`` / ``mlp.out``: summed over ``d_model``).
  ``per="all"`` sums over positions, which is the linear estimate of patching a node at every
  position at once. Padding contributes nothing (masked, and the metric never reads it).
- Scores have the units and orientation of activation patching: the estimated patched metric
  ``m_base + effect`` averaged over prompts (a prompt without a given position stays unpatched
  there), or with ``normalize`` its :func:`~mechkit.patching.metrics.recovery` between the clean
  and corrupt runs. ``per_prompt`` keeps a leading ``prompt`` axis of raw estimates instead (NaN at
  positions a prompt does not have).

Options (see :class:`AttributionConfig`):

- ``method="relp"`` (relevance patching): the same two runs, with the backward under the
  layer-wise relevance rules of :mod:`mechkit.patching.relevance` (norm scales constant,
  nonlinearities as ``x · (f(x)/x)``, gated products halved). ``relp_attention`` picks the
  attention rule: ``"gradient"`` (default: softmax and its products untouched), ``"detach"``
  (probabilities constant, CP-LRP's AH rule) or ``"half"`` (AttnLRP: q·kᵀ and A·v halved). The
  default is the one that tracked exact noising best on SmolLM2 IOI (8 prompts, all 30 layers ×
  position: resid_pre Pearson 0.91 vs 0.76 detached and 0.78 for AtP; mlp.out 0.86 vs 0.75 and 0.73).
- ``qk_fix`` (AtP*): for query and key nodes (``attn.q`` / ``attn.k``) the attention pattern is
  recomputed *exactly* with the patched query or key — ``softmax(q · kᵀ / √d_head)`` over the keys a
  query may see — and only what follows the pattern is linearised: effect ≈ Σ (A_patched − A) ·
  ∂m/∂A. Patching the key at position ``s`` changes column ``s`` of every row; ``per="all"`` patches
  every key of the head at once. The scores come from ``attn.rot_q`` / ``attn.rot_k`` (after rotary
  embeddings) where the backend has them, else from ``attn.q`` / ``attn.k``; patterns that are not
  reproduced from them (another score function) are an error.
- ``grad_drop`` (AtP*): for each layer ℓ the backward runs again with the gradient through layer
  ℓ's ``attn.out`` and ``mlp.out`` set to zero (their forward values unchanged), which removes the
  paths through ℓ; the score is ``Σ_ℓ |ĉ_ℓ| / (L − 1)`` with ``ĉ_ℓ`` the prompt-mean effect (per
  prompt with ``per_prompt``). These are *magnitudes* of the effect (``normalize``: divided by
  ``|m_clean − m_corrupt|``), meant for ranking, at the cost of ``L`` backward passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mechkit.config import Config, ConfigError, option
from mechkit.errors import MechkitError
from mechkit.patching.metrics import recovery, resolve_metric
from mechkit.patching.pairs import PatchingPairs
from mechkit.patching.relevance import relevance_rules
from mechkit.patching.result import PatchingResult
from mechkit.provenance import provenance
from mechkit.sites import Site

__all__ = ["NODE_SITES", "AttributionConfig", "AttributionCorrelation", "attribution_correlation",
           "attribution_nodes", "attribution_patching"]

NODE_SITES = ("blocks.*.attn.z,blocks.*.mlp.post,blocks.*.resid_pre,blocks.*.attn.out,blocks.*.mlp.out,"
              "blocks.*.resid_post")
_SUMMED_AXES = ("d_model", "d_head", "vocab")
Metric = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True, kw_only=True)
class AttributionConfig(Config):
    """How attribution patching estimates patching effects."""

    sites: str = option("blocks.*.attn.z", help="sites whose nodes are scored (a glob or a comma-separated list); "
                        "one node type per result: heads, neurons or layer outputs")
    metric: str = option("logit_diff", help="per-prompt metric: logit_diff, logprob or prob (or pass a function)")
    per: Literal["position", "all"] = option("position", help="'position': a node per position; 'all': each node "
                                             "patched at every position at once")
    direction: Literal["denoise", "noise"] = option("noise", help="'noise': corrupt patched into the clean run "
                                                    "(gradient on the clean run, as in AtP / AtP*); 'denoise': "
                                                    "clean patched into the corrupt run (gradient there)")
    normalize: bool = option(True, help="scores as recovery between the clean and corrupt runs (else raw metric)")
    method: Literal["atp", "relp"] = option("atp", help="'atp': true gradients; 'relp': relevance rules in the "
                                            "backward (torch_hooks backend, GPT-2 / LLaMA)")
    relp_attention: Literal["detach", "half", "gradient"] = option(
        "gradient", help="RelP's attention rule: probabilities constant ('detach'), bilinear q·k and A·v halved with "
        "the softmax gradient kept ('half'), or untouched ('gradient')")
    qk_fix: bool = option(False, help="AtP*: exact softmax for query and key nodes (attn.q / attn.k sites)")
    grad_drop: bool = option(False, help="AtP*: mean |effect| over backward passes that each drop one layer")
    per_prompt: bool = option(False, help="keep a leading prompt axis of raw per-prompt estimates")

    def check(self) -> None:
        if self.per_prompt and self.normalize:
            raise ConfigError("per_prompt gives raw per-prompt metric estimates; pass normalize=False with it")
        if self.qk_fix and self.method == "relp":
            raise ConfigError("qk_fix linearises through the attention pattern, which RelP holds constant; "
                              "use one of them")

    @property
    def site_list(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]


class AttributionCorrelation(NamedTuple):
    """Agreement of two patching results over the cells they share."""

    pearson: float
    spearman: float
    n_cells: int


@dataclass(frozen=True)
class _Runs:
    """Per-prompt metric of the base, clean and corrupt runs, and the real-token mask ``[n, pos]``."""

    base: Tensor
    clean: Tensor
    corrupt: Tensor
    real: Tensor


def attribution_patching(model: Any, pairs: PatchingPairs, config: AttributionConfig | None = None, *,
                         metric: str | Metric | None = None, **options: Any) -> PatchingResult:
    """Attribution-patching scores of the nodes at ``sites`` (one node type), as a :class:`PatchingResult`.

    Axes: ``("site", "position")`` for layer outputs, ``("site", "head", "position")`` for heads,
    ``("site", "neuron", "position")`` for neurons (no ``position`` with ``per="all"``; a leading
    ``prompt`` axis with ``per_prompt``).
    """
    cfg, fn, name = _settings(config, options, metric)
    sites = _node_sites(model, cfg.site_list)
    groups = _groups(sites)
    if len({_shape_key(model, s) for s in sites}) > 1:
        kinds = "; ".join(f"{key}: {', '.join(str(s) for s in group[:2])}" for key, group in groups.items())
        raise MechkitError(f"the sites hold different node types ({kinds}); score them in separate calls or use "
                           "attribution_nodes(), which returns one result per node type")
    effects, runs = _estimate(model, pairs, sites, fn, cfg)
    return _result(model, pairs, sites, effects, runs, cfg, name)


def attribution_nodes(model: Any, pairs: PatchingPairs, config: AttributionConfig | None = None, *,
                      metric: str | Metric | None = None, **options: Any) -> dict[str, PatchingResult]:
    """All node types from the same two runs: ``{"layers": ..., "attn.z": ..., "mlp.post": ...}``.

    ``sites`` defaults to :data:`NODE_SITES` (every head, neuron and layer output); keys are
    ``"layers"`` for the layer outputs and the site kind for head and neuron sites.
    """
    if config is None and "sites" not in options:
        options = {**options, "sites": NODE_SITES}
    cfg, fn, name = _settings(config, options, metric)
    sites = _node_sites(model, cfg.site_list)
    effects, runs = _estimate(model, pairs, sites, fn, cfg)
    out = {}
    for key, group in _groups(sites).items():
        part = [{s: e[s] for s in group} for e in effects]
        out[key] = _result(model, pairs, group, part, runs, cfg, name)
    return out


def attribution_correlation(approx: PatchingResult, exact: PatchingResult) -> AttributionCorrelation:
    """Pearson and Spearman correlation of two results over their shared cells (matched by labels).

    Both must have the same axes and direction and both be normalised (or both raw: recovery is affine
    in the metric but its slope has the sign of m_clean − m_corrupt); cells NaN in either are skipped.
    """
    approx, exact = _heads_flat(approx), _heads_flat(exact)
    if tuple(approx.axes) != tuple(exact.axes):
        raise MechkitError(f"the results have different axes {approx.axes} and {exact.axes}; compare results of "
                           "the same sweep (same sites, per-position or all positions)")
    if approx.direction != exact.direction:
        raise MechkitError(f"one result is {approx.direction} and the other {exact.direction}; they estimate "
                           "different patches — use the same direction")
    if approx.normalized != exact.normalized:
        raise MechkitError("one result is normalised (recovery) and the other holds raw metric values; compute "
                           "both with the same normalize setting")
    keys = list(approx.axes)
    left, right = (r.to_frame()[[*keys, "score"]] for r in (approx, exact))
    merged = left.merge(right, on=keys, suffixes=("_approx", "_exact")).dropna()
    if len(merged) < 3:
        raise MechkitError(f"the results share {len(merged)} scored cells; a correlation needs at least 3")
    a, b = merged["score_approx"].astype(float), merged["score_exact"].astype(float)
    if a.std() == 0 or b.std() == 0:
        raise MechkitError("one result has the same score in every shared cell; its correlation is undefined")
    return AttributionCorrelation(float(a.corr(b)), float(a.corr(b, method="spearman")), len(merged))


def _heads_flat(result: PatchingResult) -> PatchingResult:
    """A ``("site", "head", ...)`` result as activation patching lays heads out: one ``"L3.H2"`` axis."""
    if tuple(result.axes[:2]) != ("site", "head"):
        return result
    layers = [Site.parse(s).layer for s in result.label("site")]
    heads = [f"L{layer}.H{h.removeprefix('H')}" for layer in layers for h in result.label("head")]
    return dataclasses.replace(result, scores=result.scores.flatten(0, 1), axes=("head", *result.axes[2:]),
                               labels={"head": heads, **{a: result.label(a) for a in result.axes[2:]}})


# -- settings and sites -----------------------------------------------------------------------------


def _settings(config: AttributionConfig | None, options: dict[str, Any],
              metric: str | Metric | None) -> tuple[AttributionConfig, Metric, str]:
    if config is not None and not isinstance(config, AttributionConfig):
        raise TypeError(f"config must be an AttributionConfig, got {type(config).__name__}")
    if "sites" in options and not isinstance(options["sites"], str):
        options = {**options, "sites": ",".join(str(s) for s in options["sites"])}
    if isinstance(metric, str):
        options = {**options, "metric": metric}
    cfg = AttributionConfig.from_dict(options) if config is None else config.replace(**options)
    if callable(metric):
        return cfg, metric, getattr(metric, "__name__", "custom")
    return cfg, resolve_metric(cfg.metric), cfg.metric


def _node_sites(model: Any, specs: list[str]) -> list[Site]:
    if not specs:
        raise MechkitError("no sites to score: pass sites=, e.g. 'blocks.*.attn.z' or 'blocks.*.resid_pre'")
    sites = model.resolve(specs)
    for site in sites:
        axes = site.axes
        if site.splice is not None or site.head is not None or site.expert is not None or axes[:2] != ("batch", "pos") \
                or "key_pos" in axes or len(axes) > 4:
            raise MechkitError(f"{site} cannot be an attribution node: score whole sites with a position axis "
                               "(resid_*, attn.out, mlp.out, attn.z/q/k/v, mlp.pre/post); narrow afterwards")
    return sites


def _unit(site: Site) -> str | None:
    """The axis a node is indexed by besides position (head, neuron, ...), None for layer outputs."""
    rest = [a for a in site.axes[2:] if a not in _SUMMED_AXES]
    return rest[0] if rest else None


def _shape_key(model: Any, site: Site) -> tuple[str | None, int | None]:
    """Sites that can share one result: the same unit axis of the same size."""
    unit = _unit(site)
    if unit != "head":
        return unit, None
    kv = site.kind in ("attn.k", "attn.v")
    return unit, model.info.n_kv_heads if kv else model.info.n_heads


def _groups(sites: Sequence[Site]) -> dict[str, list[Site]]:
    groups: dict[str, list[Site]] = {}
    for site in sites:
        groups.setdefault("layers" if _unit(site) is None else site.kind, []).append(site)
    return groups


# -- the estimate -----------------------------------------------------------------------------------


def _estimate(model: Any, pairs: PatchingPairs, sites: list[Site], fn: Metric,
              cfg: AttributionConfig) -> tuple[list[dict[Site, Tensor]], _Runs]:
    """Per-prompt effects ``{site: [n, pos, *unit]}`` (one dict, or one per dropped layer) and the runs."""
    base, source = (pairs.corrupt, pairs.clean) if cfg.direction == "denoise" else (pairs.clean, pairs.corrupt)
    qk = [s for s in sites if cfg.qk_fix and s.kind in ("attn.q", "attn.k")]
    if cfg.qk_fix and not qk:
        raise MechkitError("qk_fix applies to query and key nodes: add sites such as 'blocks.*.attn.q' and "
                           "'blocks.*.attn.k'")
    extra = [Site(kind, s.layer) for s in qk for kind in (*_score_kinds(model, s.layer), "attn.pattern")]
    read = list(dict.fromkeys([*sites, *extra]))
    src = model.run_with_cache(source, read)
    drops: list[dict[str, Any]] = [{}] if not cfg.grad_drop else _layer_drops(model)
    summed = _summed(fn, pairs)
    effects = []
    for drop in drops:
        with _backward_rules(model, cfg):
            grads = model.gradients(base, read, summed, interventions=drop)
        real = base.attention_mask.bool()
        effects.append({s: _qk_effect(s, _score_kinds(model, s.layer), grads, src.cache, real, cfg.per) if s in qk
                        else _linear_effect(s, src.cache[s] - grads.activations[s], grads.grads[s], real)
                        for s in sites})
    m_base, m_source = fn(grads.logits, pairs).double(), fn(src.logits, pairs).double()
    clean, corrupt = (m_source, m_base) if cfg.direction == "denoise" else (m_base, m_source)
    _check_finite(m_source, "source")
    return effects, _Runs(m_base, clean, corrupt, base.attention_mask.bool())


def _summed(fn: Metric, pairs: PatchingPairs) -> Callable[[Tensor, Any], Tensor]:
    def summed(logits: Tensor, batch: Any) -> Tensor:
        rows = fn(logits, pairs)
        _check_finite(rows, "base")
        return rows.sum()

    return summed


def _check_finite(rows: Tensor, which: str) -> None:
    bad = (~torch.isfinite(rows.detach())).nonzero().flatten().tolist()
    if bad:
        raise MechkitError(f"the metric is NaN or infinite on the {which} run for prompts {bad[:5]}; check the "
                           "answer tokens and the metric (attribution needs finite per-prompt values)")


@contextlib.contextmanager
def _backward_rules(model: Any, cfg: AttributionConfig) -> Iterator[None]:
    if cfg.method == "relp":
        with relevance_rules(model, attention=cfg.relp_attention):
            yield
    else:
        yield


def _layer_drops(model: Any) -> list[dict[str, Any]]:
    n = model.info.n_layers
    if n < 2:
        raise MechkitError("grad_drop averages over the other layers' dropouts and needs at least 2 layers")
    return [{f"blocks.{layer}.attn.out": _no_gradient, f"blocks.{layer}.mlp.out": _no_gradient}
            for layer in range(n)]


def _no_gradient(act: Tensor) -> Tensor:
    """The same value with no gradient flowing back through it."""
    return act.detach()


def _linear_effect(site: Site, delta: Tensor, grad: Tensor, real: Tensor) -> Tensor:
    """``Δa · ∂m/∂a`` per node ``[n, pos, *unit]``: summed over ``d_head`` / ``d_model``, zero at padding."""
    product = delta.double() * grad.double()
    if site.axes[-1] in _SUMMED_AXES:
        product = product.sum(-1)
    return product * _broadcast(real, product)


def _broadcast(real: Tensor, like: Tensor) -> Tensor:
    return real.reshape(*real.shape, *([1] * (like.dim() - 2))).to(like.dtype)


# -- AtP*: exact softmax for query and key nodes ----------------------------------------------------


def _score_kinds(model: Any, layer: int | None) -> tuple[str, str]:
    """The query and key sites whose scaled dot product is layer ``layer``'s attention score: after
    rotary embeddings where the model has them (patching a query or key at a position patches its
    rotated value there, so the node effect is the same)."""
    return ("attn.rot_q", "attn.rot_k") if Site("attn.rot_q", layer) in model.sites else ("attn.q", "attn.k")


def _qk_effect(site: Site, kinds: tuple[str, str], grads: Any, source: Any, real: Tensor, per: str) -> Tensor:
    """Effects ``[n, pos, head]`` of patching one query (or key) with the pattern recomputed exactly."""
    layer, (q_kind, k_kind) = site.layer, kinds
    q, k = (grads.activations[Site(kind, layer)].double() for kind in kinds)
    pattern = grads.activations[Site("attn.pattern", layer)].double()
    g = grads.grads[Site("attn.pattern", layer)].double()
    visible = _visible(real)
    scores = _scores(q, k, visible)
    _check_reproducible(scores, pattern, real, layer)
    if site.kind == "attn.q":
        patched = _scores(source[Site(q_kind, layer)].double(), k, visible).softmax(-1)
        return ((patched - pattern) * g).sum(-1).transpose(1, 2) * _broadcast(real, q[..., 0])
    new = _scores(q, source[Site(k_kind, layer)].double(), visible)
    n_kv = k.shape[2]
    if per == "all":  # every key of the head patched at once: one exact softmax per row
        total = _group_heads(((new.softmax(-1) - pattern) * g).sum((-1, -2)), n_kv)
        out = torch.zeros(*real.shape, n_kv, dtype=total.dtype)
        out[:, 0] = total  # summed over positions by per="all"
        return out
    effect = _group_heads(_single_key_effects(scores, new, pattern, g, visible).sum(-2), n_kv)  # [b, kv, s]
    return effect.transpose(1, 2) * _broadcast(real, k[..., 0])


def _visible(real: Tensor) -> Tensor:
    """``[b, 1, t, s]``: key ``s`` is a real token at or before query ``t``."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return causal[None, None] & real[:, None, None, :]


def _scores(q: Tensor, k: Tensor, visible: Tensor) -> Tensor:
    """Attention logits ``[b, head, t, s]`` = q · kᵀ / √d_head (keys shared by their query-head group)."""
    groups = q.shape[2] // k.shape[2]
    keys = k.repeat_interleave(groups, dim=2) if groups > 1 else k
    scores = torch.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~visible, -math.inf)


def _check_reproducible(scores: Tensor, pattern: Tensor, real: Tensor, layer: int | None) -> None:
    rows = real[:, None, :, None]
    gap = ((scores.softmax(-1) - pattern).abs() * rows).max()
    if float(gap) > 1e-4:
        raise MechkitError(f"qk_fix: layer {layer}'s attention pattern is not softmax(q·kᵀ/√d_head) of its query "
                           f"and key sites (max difference {float(gap):.3g}; rotary position embeddings on a backend "
                           "without attn.rot_q / attn.rot_k, or another score function?), so it cannot be recomputed "
                           "exactly; use backend='torch_hooks' or qk_fix=False")


def _single_key_effects(scores: Tensor, new: Tensor, pattern: Tensor, g: Tensor, visible: Tensor) -> Tensor:
    """``[b, h, t, s]``: change of Σ_s' A[t, s'] · ∂m/∂A[t, s'] when only key ``s`` takes its patched value.

    Only entry ``(t, s)`` of the logits moves, by δ; the row renormalises: A'[t, s] = p·e^δ / Z and
    A'[t, s'] = A[t, s'] / Z with Z = 1 − p + p·e^δ, p = A[t, s].
    """
    delta = torch.where(visible, new - scores, torch.zeros_like(scores)).clamp(max=700.0)
    p, scale = pattern, delta.exp()
    weighted = (pattern * g).sum(-1, keepdim=True)
    z = 1 - p + p * scale
    after = (weighted - p * g + p * scale * g) / z
    return torch.where(visible, after - weighted, torch.zeros_like(after))


def _group_heads(effect: Tensor, n_kv: int) -> Tensor:
    """Sum query heads ``[b, head, ...]`` into the KV head they read ``[b, kv, ...]``."""
    b, h = effect.shape[:2]
    return effect.reshape(b, n_kv, h // n_kv, *effect.shape[2:]).sum(2)


# -- the result ---------------------------------------------------------------------------------------


def _result(model: Any, pairs: PatchingPairs, sites: list[Site], effects: list[dict[Site, Tensor]], runs: _Runs,
            cfg: AttributionConfig, name: str) -> PatchingResult:
    stacked = [torch.stack([_positions_last(e[s], cfg.per) for s in sites], 1) for e in effects]  # [n, site, ...]
    missing = None
    if cfg.per == "position":
        missing = ~runs.real.reshape(runs.real.shape[0], *([1] * (stacked[0].dim() - 2)), runs.real.shape[1])
    if cfg.grad_drop:
        scores = _grad_drop_scores(stacked, runs, cfg)
    else:
        est = runs.base.reshape(-1, *([1] * (stacked[0].dim() - 1))) + stacked[0]
        scores = est if cfg.per_prompt else est.mean(0)
        if cfg.normalize:
            scores = recovery(scores, runs.clean.mean(), runs.corrupt.mean(), direction=cfg.direction)
    if cfg.per_prompt and missing is not None:
        scores = scores.masked_fill(missing.expand_as(scores), math.nan)
    unit = _unit(sites[0])
    axes = ("site", *([unit] if unit else []), *(["position"] if cfg.per == "position" else []))
    labels = {"site": [str(s) for s in sites]}
    if unit == "head":
        labels["head"] = [f"H{h}" for h in range(stacked[0].shape[2])]
    elif unit == "neuron":
        labels["neuron"] = [f"N{j}" for j in range(stacked[0].shape[2])]
    if cfg.per == "position":
        labels["position"] = _position_labels(model, pairs)
    if cfg.per_prompt:
        axes, labels["prompt"] = ("prompt", *axes), [str(i) for i in range(len(pairs))]
    return PatchingResult(
        scores.float(), axes, labels, method=_method_name(cfg), metric=name, direction=cfg.direction,
        normalized=cfg.normalize, clean=float(runs.clean.mean()), corrupt=float(runs.corrupt.mean()),
        n_prompts=len(pairs), config=cfg.to_dict(), provenance=provenance(model, sites),
    )


def _positions_last(effect: Tensor, per: str) -> Tensor:
    """``[n, pos, *unit]`` → ``[n, *unit, pos]``, or ``[n, *unit]`` summed over positions."""
    moved = effect.movedim(1, -1)
    return moved.sum(-1) if per == "all" else moved


def _grad_drop_scores(stacked: list[Tensor], runs: _Runs, cfg: AttributionConfig) -> Tensor:
    magnitudes = [(s if cfg.per_prompt else s.mean(0)).abs() for s in stacked]
    scores = torch.stack(magnitudes).sum(0) / (len(stacked) - 1)
    if cfg.normalize:
        recovery(runs.clean.mean(), runs.clean.mean(), runs.corrupt.mean())  # the no-effect check
        scores = scores / (runs.clean.mean() - runs.corrupt.mean()).abs()
    return scores


def _method_name(cfg: AttributionConfig) -> str:
    fixes = [name for name, on in (("qk_fix", cfg.qk_fix), ("grad_drop", cfg.grad_drop)) if on]
    return "+".join([cfg.method, *fixes])


def _position_labels(model: Any, pairs: PatchingPairs) -> list[str]:
    """``"p: token"`` where every prompt with position ``p`` has the same clean token there, ``"p: *"``
    where they differ (the labels of activation patching, so results line up cell by cell)."""
    ids, real = pairs.clean.input_ids, pairs.clean.attention_mask.bool()
    tokenizer = getattr(model, "tokenizer", None)
    labels = []
    for p in range(ids.shape[1]):
        tokens = ids[real[:, p], p].unique()
        if tokenizer is None or tokens.numel() == 0:
            labels.append(str(p))
        else:
            labels.append(f"{p}: {tokenizer.decode([int(tokens[0])])}" if tokens.numel() == 1 else f"{p}: *")
    return labels
