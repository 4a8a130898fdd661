"""Activation patching sweeps, batched: many patched variants share one forward pass.

::

    pairs = make_pairs(model, tasks.generate("ioi", 16, 0, corrupt="abc"))
    activation_patching(model, pairs)                                   # resid_pre × position
    activation_patching(model, pairs, sites="blocks.*.attn.z", positions="all")   # heads, all positions
    activation_patching(model, pairs, sites="blocks.*.mlp.post", neurons="all", positions="last")

A sweep is a grid of *cells* (site or head or neuron × position slot). Every (cell, prompt) pair
is one batch row: ``pairs.select`` repeats each prompt once per variant, and each touched site
gets ONE :class:`~mechkit.interventions.Replace` whose per-row boolean masks (``[batch, pos]``
positions, ``[batch, n]`` heads / neurons) say which rows it edits where. Rows are cut into chunks
that keep a forward under ``memory_mb`` (or ``variants_per_forward``). Source activations come
from one cached run of the source prompts (clean when denoising, corrupt when noising).

Positions are counted among real tokens and padding is never patched. For prompts of different
lengths, ``positions="each"`` with ``align="start"`` makes cell ``p`` the ``p``-th real token of
every prompt that has one (``align="end"``: cell ``-k`` is each prompt's ``k``-th token from its
end); explicit positions work the same way (negative ones from each prompt's end). A cell's score
averages over the prompts that have it — patched metric, and for recovery the clean and corrupt
metrics over those same prompts — and is NaN when no prompt has it. A batched sweep therefore
equals patching each prompt alone and averaging (tested).

With ``skip_unchanged`` (the default) the target run is cached too, and a (cell, prompt) whose
patch would write what the site already holds — e.g. every position before the first token where
the clean and corrupt prompts differ — gets the unpatched metric without a forward. Each patched
forward resumes from the target run's residual stream at the lowest layer it patches
(``run_with_interventions(start=...)``), so the blocks below cost nothing, and computes only the
positions from the first clean/corrupt difference on (``prefix=``; the keys and values before it
are the target run's — on IOI pairs that differ at the second subject, most of the prompt). On a CPU, where a
forward is compute-bound, skipping rows and layers (not stacking rows) is what saves time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.patching.config import PatchConfig
from mechkit.patching.metrics import logits_needed, recovery, resolve_metric
from mechkit.patching.pairs import PatchingPairs
from mechkit.patching.result import PatchingResult
from mechkit.provenance import provenance
from mechkit.sites import Site

__all__ = ["activation_patching"]

ALL = -2  # slot value: every real token of the row
MISSING = -1  # slot value: the prompt has no such position
FLOAT_BYTES = 4
UNCHANGED = 1e-6  # a patch moving a site by less than this fraction of its scale changes nothing


@dataclass(frozen=True)
class _Plan:
    """The cells of a sweep: units (site, head/neuron or -1) × position slots, and how they are laid out."""

    sites: list[Site]
    unit_site: Tensor  # [U] index into sites
    unit_index: Tensor  # [U] head / neuron index, -1 for the whole site
    unit_axis: str | None  # "head" / "neuron" / None
    slots: Tensor  # [P, n]: real-token index per prompt, MISSING or ALL
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    labels: dict[str, list[str]]


def activation_patching(model: Any, pairs: PatchingPairs, config: PatchConfig | None = None,
                        **options: Any) -> PatchingResult:
    """Patch every cell of the sweep and score it.

    ``pairs``: :func:`~mechkit.patching.make_pairs`. Settings are the fields of
    :class:`PatchConfig`, as ``config=`` and/or keywords (keywords win); ``metric=`` may also be a
    function ``metric(logits, pairs) -> [batch]``. Returns a :class:`PatchingResult` with axes
    ``("site", "position")`` for whole sites, ``("head", "position")`` for heads (labels
    ``"L3.H2"``), ``("site", "neuron", "position")`` for neurons; the position axis is dropped for
    ``positions="last"`` / ``"all"``. Scores are :func:`recovery` values unless ``normalized=False``.
    """
    metric_fn, options = _metric_option(options)
    cfg = _settings(config, options)
    metric = metric_fn or resolve_metric(cfg.metric)
    if not isinstance(pairs, PatchingPairs):
        raise MechkitError(f"pairs must be PatchingPairs (from make_pairs), got {type(pairs).__name__}")
    _check_pairs(pairs)
    sites = model.resolve(cfg.site_list)
    _unit_axis(sites, cfg)  # refuse a site selection the sweep cannot lay out before running anything
    denoise = cfg.direction == "denoise"
    source_batch, target_batch = (pairs.clean, pairs.corrupt) if denoise else (pairs.corrupt, pairs.clean)
    source = model.run_with_cache(source_batch, sites)
    # the target run's residual stream at each patched layer lets patched forwards resume there
    target_sites = [*(sites if cfg.skip_unchanged else []), *_start_sites(sites)]
    target = model.run_with_cache(target_batch, target_sites) if target_sites else None
    m_source = _scores(metric, source.logits, pairs)
    m_target = _scores(metric, target.logits if target is not None else model(target_batch), pairs)
    m_clean, m_corrupt = (m_source, m_target) if denoise else (m_target, m_source)
    _check_finite(m_clean, m_corrupt)
    if cfg.normalized:  # fail before the sweep when there is nothing to explain
        recovery(m_clean.mean(), m_clean.mean(), m_corrupt.mean(), direction=cfg.direction)
    plan = _plan(model, pairs, sites, source.cache, cfg)
    caches = (source.cache, None if target is None else target.cache)
    patched, count, clean, corrupt = _sweep(model, pairs, caches, plan, cfg, metric, (m_clean, m_corrupt))
    scores = _finish(patched, count, clean, corrupt, cfg)
    return PatchingResult(
        scores=scores.reshape(plan.shape).float(), axes=plan.axes, labels=plan.labels, method="activation",
        metric=cfg.metric, direction=cfg.direction,
        normalized=cfg.normalized, clean=float(m_clean.mean()), corrupt=float(m_corrupt.mean()),
        n_prompts=len(pairs), config=cfg.to_dict(), provenance=provenance(model, [str(s) for s in sites]),
    )


# -- settings ------------------------------------------------------------------------------------


def _metric_option(options: dict[str, Any]) -> tuple[Callable[..., Tensor] | None, dict[str, Any]]:
    """A metric function given as ``metric=`` (not a config value: it is kept out of the config)."""
    metric = options.get("metric")
    if callable(metric):
        rest = {k: v for k, v in options.items() if k != "metric"}
        return metric, {**rest, "metric": getattr(metric, "__name__", "custom")}
    return None, options


def _settings(config: PatchConfig | None, options: dict[str, Any]) -> PatchConfig:
    if config is not None and not isinstance(config, PatchConfig):
        raise TypeError(f"config must be a PatchConfig, got {type(config).__name__}")
    if "sites" in options and not isinstance(options["sites"], str):
        options = {**options, "sites": ",".join(str(s) for s in options["sites"])}
    if isinstance(options.get("positions"), int) and not isinstance(options["positions"], bool):
        options = {**options, "positions": (options["positions"],)}
    return PatchConfig.from_dict(options) if config is None else config.replace(**options)


# -- metric values -------------------------------------------------------------------------------


def _scores(metric: Callable[..., Tensor], logits: Tensor, targets: PatchingPairs) -> Tensor:
    value = metric(logits, targets)
    if not isinstance(value, Tensor) or value.shape != (logits.shape[0],):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise MechkitError(f"the metric returned {shape}; a patching metric returns one value per row "
                           f"([{logits.shape[0]}]), e.g. mechkit.patching.logit_diff")
    return value.detach().double().cpu()


def _check_pairs(pairs: PatchingPairs) -> None:
    clean, corrupt = pairs.clean.attention_mask, pairs.corrupt.attention_mask
    if clean.shape != corrupt.shape or not torch.equal(clean.bool(), corrupt.bool()):
        raise MechkitError("the clean and corrupt prompts of some pairs have different real lengths, so positions "
                           "would not line up; build the pairs with make_pairs, which checks each pair")


def _check_finite(*values: Tensor) -> None:
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise MechkitError("the metric returned NaN or infinite values; check the answer tokens and the metric")


# -- the plan ------------------------------------------------------------------------------------


def _plan(model: Any, pairs: PatchingPairs, sites: list[Site], cache: Any, cfg: PatchConfig) -> _Plan:
    axis = _unit_axis(sites, cfg)
    units_site, units_index, unit_labels = [], [], []
    for s, site in enumerate(sites):
        for j in _units(site, cache[site], axis, cfg):
            units_site.append(s)
            units_index.append(j)
            unit_labels.append(_unit_label(site, j, axis, sites))
    slots, slot_labels = _slots(model, pairs, cfg)
    n_sites, n_units = len(sites), len(units_site)
    if axis == "neuron":
        shape, axes = (n_sites, n_units // n_sites, len(slots)), ("site", "neuron", "position")
        labels = {"site": [str(s) for s in sites], "neuron": unit_labels[: n_units // n_sites]}
    elif axis == "head":
        shape, axes, labels = (n_units, len(slots)), ("head", "position"), {"head": unit_labels}
    else:
        shape, axes, labels = (n_sites, len(slots)), ("site", "position"), {"site": [str(s) for s in sites]}
    if isinstance(cfg.positions, str) and cfg.positions in ("last", "all"):
        shape, axes = shape[:-1], axes[:-1]
    else:
        labels["position"] = slot_labels
    return _Plan(sites, torch.tensor(units_site), torch.tensor(units_index), axis, slots, shape, axes, labels)


def _unit_axis(sites: list[Site], cfg: PatchConfig) -> str | None:
    heads = [s for s in sites if "head" in s.axes]
    neurons = [s for s in sites if "neuron" in s.axes]
    bad = [s for s in sites if "pos" not in s.axes or "key_pos" in s.axes]
    if bad:
        raise MechkitError(f"cannot sweep {bad[0]}: activation patching takes sites with a position axis "
                           "(resid_*, attn.out, mlp.out, attn.q/k/v/z, mlp.pre/post, ...)")
    if cfg.neurons is not None:
        if len(neurons) != len(sites):
            other = next(s for s in sites if "neuron" not in s.axes)
            raise MechkitError(f"neurons= sweeps mlp.pre / mlp.post sites, but {other} has no neuron axis; "
                               "sweep it in a separate call, or pass neurons=None to patch whole sites")
        return "neuron"
    if cfg.heads and heads:
        if len(heads) != len(sites):
            other = next(s for s in sites if "head" not in s.axes)
            raise MechkitError(f"a head sweep needs head-axis sites only (attn.q/k/v/z), but {other} has none; "
                               "sweep it in a separate call, or pass heads=False to patch whole sites")
        return "head"
    return None


def _units(site: Site, act: Tensor, axis: str | None, cfg: PatchConfig) -> list[int]:
    if axis is None:
        return [-1]
    size = act.shape[site.axes.index(axis)]
    if axis == "head" or cfg.neurons == "all":
        return list(range(size))
    bad = [i for i in cfg.neurons if not 0 <= i < size]
    if bad:
        raise MechkitError(f"neuron {bad[0]} is out of range for {site}, which has {size} neurons")
    return list(cfg.neurons)


def _unit_label(site: Site, j: int, axis: str | None, sites: list[Site]) -> str:
    if axis == "head":
        kinds = {s.kind for s in sites}
        return f"L{site.layer}.H{j}" if len(kinds) == 1 else f"L{site.layer}.H{j}.{site.kind}"
    return f"N{j}" if axis == "neuron" else str(site)


def _slots(model: Any, pairs: PatchingPairs, cfg: PatchConfig) -> tuple[Tensor, list[str]]:
    """``[P, n]`` real-token index of each slot in each prompt (MISSING / ALL), and the slot labels."""
    lengths = pairs.lengths
    longest = int(lengths.max())
    if cfg.positions == "all":
        return torch.full((1, len(pairs)), ALL), ["all"]
    if cfg.positions == "last":
        return (lengths - 1)[None], ["last"]
    if cfg.positions == "each":
        wanted = list(range(longest)) if cfg.align == "start" else list(range(-longest, 0))
    else:
        wanted = list(cfg.positions)
    index = torch.tensor(wanted)[:, None]
    k = torch.where(index >= 0, index, lengths[None] + index)
    k = torch.where((k >= 0) & (k < lengths[None]), k, torch.full_like(k, MISSING))
    return k, [_slot_label(model, pairs, p, k[i]) for i, p in enumerate(wanted)]


def _slot_label(model: Any, pairs: PatchingPairs, p: int, k: Tensor) -> str:
    """``"3: Mary"``: the position and its clean token (``"3: *"`` when prompts differ there)."""
    tokenizer = getattr(model, "tokenizer", None)
    have = (k >= 0).nonzero().flatten()
    if tokenizer is None or have.numel() == 0:
        return str(p)
    ids = {int(pairs.clean.input_ids[i, k[i]]) for i in have.tolist()}
    return f"{p}: {tokenizer.decode([ids.pop()])}" if len(ids) == 1 else f"{p}: *"


# -- the sweep -----------------------------------------------------------------------------------


def _rows(plan: _Plan, changed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (cell, prompt) that exists, cell-major: ``(cell, prompt, real-token index, changed)``,
    each ``[R]``; ``changed`` is False where the patch would write the value the site already has."""
    n_units, (n_slots, n) = plan.unit_site.shape[0], plan.slots.shape
    slot_of = plan.slots[None].expand(n_units, n_slots, n)  # [U, P, n]
    keep = (slot_of != MISSING).reshape(-1)
    cell = torch.arange(n_units * n_slots)[:, None].expand(-1, n).reshape(-1)
    prompt = torch.arange(n)[None].expand(n_units * n_slots, -1).reshape(-1)
    moved = torch.ones_like(keep) if changed is None else changed.reshape(-1)
    return cell[keep], prompt[keep], slot_of.reshape(-1)[keep], moved[keep]


def _changed(plan: _Plan, source: Any, target: Any, real: Tensor) -> Tensor:
    """``[U, P, n]``: whether patching the cell changes the prompt's activation at all.

    Differences below ``UNCHANGED`` of the site's scale count as none (identical prefixes of the
    clean and corrupt prompts compute identical activations, up to float noise), so those rows
    need no forward: their patched metric is the unpatched one.
    """
    n_slots = plan.slots.shape[0]
    parts = []
    for s, site in enumerate(plan.sites):
        src, tgt = source[site], target[site]
        diff = (src - tgt).abs()
        if plan.unit_axis is None:
            diff = diff.flatten(2).amax(-1)[..., None]  # [n, W, 1]
        elif diff.dim() > 3:  # [n, W, head, d_head] → [n, W, head]
            diff = diff.flatten(3).amax(-1)
        moved = (diff > UNCHANGED * float(tgt.abs().max())) & real[..., None]  # [n, W, K]
        units = plan.unit_index[plan.unit_site == s].clamp(min=0)
        per_unit = moved[..., units]  # [n, W, J]
        k = plan.slots.clamp(min=0)  # [P, n]
        at = per_unit.gather(1, k.T[..., None].expand(-1, -1, units.numel()))  # [n, P, J]
        whole = per_unit.any(1, keepdim=True).expand(-1, n_slots, -1)
        at = torch.where((plan.slots == ALL).T[..., None], whole, at)
        parts.append(at.permute(2, 1, 0))  # [J, P, n]
    return torch.cat(parts)


def _sweep(model: Any, pairs: PatchingPairs, caches: tuple[Any, Any], plan: _Plan, cfg: PatchConfig,
           metric: Callable[..., Tensor], base: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums per cell of the patched, clean and corrupt metrics, and the prompts counted in each."""
    from tqdm.auto import tqdm

    source, target = caches
    real = pairs.clean.attention_mask.bool()
    changed = _changed(plan, source, target, real) if cfg.skip_unchanged else None
    cells, prompts, ks, moved = _rows(plan, changed)
    n_cells = plan.unit_site.shape[0] * plan.slots.shape[0]
    unpatched = base[1] if cfg.direction == "denoise" else base[0]
    patched = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, cells[~moved], unpatched[prompts[~moved]])
    count = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, cells, torch.ones(cells.shape, dtype=torch.float64))
    cells, prompts, ks = cells[moved], prompts[moved], ks[moved]
    step = _rows_per_forward(model, pairs, source, plan, cfg)
    layers = torch.tensor([site.layer or 0 for site in plan.sites])[plan.unit_site[cells // plan.slots.shape[0]]]
    shared = shared_prefix(model, pairs)
    prefix = model.prefix_cache(pairs.corrupt if cfg.direction == "denoise" else pairs.clean, shared) if shared else 0
    for chunk in tqdm(_chunks(layers, step), desc="activation patching", disable=not cfg.progress, leave=False):
        rows = (cells[chunk], prompts[chunk], ks[chunk])
        values = _run_chunk(model, pairs, caches, plan, cfg, metric, rows, prefix)
        patched.index_add_(0, cells[chunk], values)
    cells_all, prompts_all = _rows(plan, None)[:2]
    clean = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, cells_all, base[0][prompts_all])
    corrupt = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, cells_all, base[1][prompts_all])
    return patched, count, clean, corrupt


def _run_chunk(model: Any, pairs: PatchingPairs, caches: tuple[Any, Any], plan: _Plan, cfg: PatchConfig,
               metric: Callable[..., Tensor], rows: tuple[Tensor, Tensor, Tensor], prefix: Any) -> Tensor:
    """One forward: row r is prompt ``prompts[r]`` with cell ``cells[r]`` patched; the forward
    resumes from the target run at the lowest patched layer (the blocks below are unchanged) and
    on the ``prefix`` the clean and corrupt prompts share."""
    cells, prompts, ks = rows
    cache, target = caches
    sub = pairs.select(prompts)
    batch = sub.corrupt if cfg.direction == "denoise" else sub.clean
    width = batch.input_ids.shape[1]
    unit = cells // plan.slots.shape[0]
    site_of, index_of = plan.unit_site[unit], plan.unit_index[unit]
    real = batch.attention_mask.bool()
    interventions = {}
    for s in site_of.unique().tolist():
        site, on = plan.sites[s], (site_of == s).nonzero().flatten()
        positions = torch.zeros_like(real)
        whole = ks[on] == ALL
        positions[on[whole]] = real[on[whole]]
        positions[on[~whole], ks[on[~whole]]] = True
        selectors: dict[str, Tensor] = {"positions": positions}
        if plan.unit_axis is not None:
            act = cache[site]
            units = torch.zeros(len(prompts), act.shape[site.axes.index(plan.unit_axis)], dtype=torch.bool)
            units[on, index_of[on]] = True
            selectors["heads" if plan.unit_axis == "head" else "neurons"] = units
        interventions[site] = Replace(source=cache[site][prompts][:, :width], **selectors)
    layer = _start_layer(model, [plan.sites[s] for s in site_of.unique().tolist()])
    start = None if layer is None else (Site("resid_pre", layer), target[Site("resid_pre", layer)][prompts][:, :width])
    run = model.run_with_interventions(batch, interventions, start=start, logits_at=logits_needed(model, metric),
                                       prefix=prefix)
    values = _scores(metric, run.logits, sub)
    if not bool(torch.isfinite(values).all()):
        raise MechkitError("the metric returned NaN or infinite values on a patched run; check the metric "
                           "(e.g. a log of a probability that can reach 0)")
    return values


def shared_prefix(model: Any, pairs: PatchingPairs) -> int:
    """Positions before the first token where any clean prompt differs from its corrupt twin: both
    runs compute the same activations there, so a patched run can reuse the target run's."""
    if model.info.encoder or model.edited_sites:
        return 0
    differs = (pairs.clean.input_ids != pairs.corrupt.input_ids) & pairs.clean.attention_mask.bool()
    width = differs.shape[1]
    first = torch.where(differs.any(1), differs.int().argmax(1), torch.full_like(pairs.lengths, width))
    return max(0, min(int(first.min()), int(pairs.lengths.min()) - 1))


def _chunks(layers: Tensor, step: int) -> list[slice]:
    """Consecutive rows, at most ``step`` per forward, cut where the patched layer changes (a
    forward resumes from its lowest patched layer, so mixing layers would waste the skip)."""
    cuts = [0, *((layers[1:] != layers[:-1]).nonzero().flatten() + 1).tolist(), layers.shape[0]]
    return [slice(i, min(i + step, end)) for begin, end in itertools.pairwise(cuts) for i in range(begin, end, step)]


def _start_sites(sites: list[Site]) -> list[Site]:
    return [Site("resid_pre", layer) for layer in sorted({s.layer for s in sites if s.layer})]


def _start_layer(model: Any, sites: list[Site]) -> int | None:
    """The layer a patched forward can resume from: the lowest one patched or edited by an active
    context / splice (None when that is the embedding or layer 0)."""
    layers = [s.layer for s in [*sites, *model.edited_sites]]
    if any(layer is None for layer in layers) or min(layers) == 0:
        return None
    return min(layers)


def _rows_per_forward(model: Any, pairs: PatchingPairs, cache: Any, plan: _Plan, cfg: PatchConfig) -> int:
    """Rows (variant × prompt) per forward: from ``variants_per_forward``, else from the memory estimate."""
    if cfg.variants_per_forward is not None:
        return cfg.variants_per_forward * len(pairs)
    info = model.info
    seq = int(pairs.lengths.max())
    d_model, d_mlp = info.d_model or 1, info.d_mlp or 4 * (info.d_model or 1)
    heads = info.n_heads or 1
    # a forward keeps the logits, a few residual-width tensors, an MLP hidden and the attention
    # scores alive at once; the sites a chunk patches add their source rows (a chunk is cell-major,
    # so it rarely spans more than a couple of sites)
    widest = max(math.prod(cache[s].shape[2:]) for s in plan.sites)
    per_token = (info.vocab_size or 0) + 16 * d_model + 4 * d_mlp + 3 * heads * seq + 3 * widest
    return max(1, int(cfg.memory_mb * 2**20 // (seq * per_token * FLOAT_BYTES)))


def _finish(patched: Tensor, count: Tensor, clean: Tensor, corrupt: Tensor, cfg: PatchConfig) -> Tensor:
    """Prompt means per cell; recovery where asked; NaN where no prompt has the cell."""
    have = count > 0
    scores = torch.full_like(patched, math.nan)
    mean = patched[have] / count[have]
    if not cfg.normalized:
        scores[have] = mean
        return scores
    scores[have] = recovery(mean, clean[have] / count[have], corrupt[have] / count[have], direction=cfg.direction)
    return scores
