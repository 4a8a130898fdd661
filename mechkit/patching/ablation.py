"""Ablations of model components and per-component ablation sweeps over task sets.

A component is a head (``"L2.H1"`` / ``"blocks.2.attn.z.h1"``), a layer's attention or MLP output
(``"L2.attn"`` / ``"L2.mlp"``), a whole layer (``"L2"``: both of its sublayer outputs), neurons
(``"L2.N17"``, an entry of ``blocks.2.mlp.post``) or any site with a position axis; ``"heads"``,
``"attn"``, ``"mlp"``, ``"layers"`` expand to every one of the model. Ablation kinds:

- ``zero``: the component's output is 0;
- ``mean``: its mean over every real token of a reference dataset (padding never counted);
- ``resample``: each row takes the value of a reference row (a seeded draw; the k-th real token
  of the row gets the donor's k-th, and only donors with enough real tokens are drawn).

:func:`ablation_sweep` ablates one component at a time and scores each task set, side by side —
the recall-vs-reasoning dissociation table: which components hurt recall but not reasoning, and
the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor

from mechkit.config import Config, ConfigError, option
from mechkit.errors import MechkitError
from mechkit.interventions import Intervention, Mean, Resample, Zero
from mechkit.models.inputs import Batch
from mechkit.patching.metrics import logits_needed, resolve_metric
from mechkit.patching.pairs import PatchingPairs, answer_token
from mechkit.patching.result import PatchingResult
from mechkit.provenance import provenance
from mechkit.sites import Site
from mechkit.tasks import TaskSet

__all__ = ["AblationConfig", "AblationResult", "Component", "ablation", "ablation_sweep", "components",
           "reference_means"]

AblationKind = Literal["zero", "mean", "resample"]
Reference = Union[TaskSet, Sequence[str], Batch]
GROUPS = ("heads", "attn", "mlp", "layers")


@dataclass(frozen=True)
class Component:
    """One ablatable part: the sites it writes (heads as narrowed sites) and, for neurons, which ones."""

    name: str
    sites: tuple[str, ...]
    neurons: tuple[int, ...] | None = None


def components(model: Any, specs: str | Sequence[str]) -> list[Component]:
    """Component names (see the module docstring) → components checked against ``model``, in order."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise MechkitError("no components given: name heads ('L2.H1'), sublayers ('L2.attn', 'L2.mlp'), layers "
                           f"('L2'), neurons ('L2.N17'), sites, or one of {', '.join(GROUPS)}")
    out: dict[str, Component] = {}
    expanded = _expand_groups(model, [str(s).strip() for s in specs])
    for spec in expanded:
        comp = _component(model, spec)
        out.setdefault(comp.name, comp)
    return list(out.values())


def _expand_groups(model: Any, specs: list[str]) -> list[str]:
    """``attn`` / ``mlp`` / ``layers`` / ``heads`` → one name per layer (per head), interleaved by layer."""
    groups = [s for s in specs if s in GROUPS]
    if not groups:
        return specs
    info, out = model.info, []
    for layer in range(info.n_layers):
        for group in groups:
            if group == "heads":
                out += [f"L{layer}.H{h}" for h in range(info.n_heads or 0)]
            else:
                out.append(f"L{layer}" if group == "layers" else f"L{layer}.{group}")
    return out + [s for s in specs if s not in GROUPS]


_SHORT = re.compile(r"L(\d+)(?:\.(attn|mlp|H(\d+)|N(\d+)))?")
_BLOCK = re.compile(r"blocks\.(\d+)")


def _component(model: Any, spec: str) -> Component:
    valid = (f"components are 'L<layer>.H<head>', 'L<layer>.attn', 'L<layer>.mlp', 'L<layer>', 'L<layer>.N<neuron>' "
             f"(layer 0–{model.info.n_layers - 1}), a site name, or one of {', '.join(GROUPS)}")
    if m := _SHORT.fullmatch(spec):
        layer, part = int(m[1]), m[2]
        if layer >= model.info.n_layers:
            raise MechkitError(f"component {spec!r}: layer {layer} does not exist; {valid}")
        if part is None:
            return Component(spec, (f"blocks.{layer}.attn.out", f"blocks.{layer}.mlp.out"))
        if part in ("attn", "mlp"):
            return Component(spec, (f"blocks.{layer}.{part}.out",))
        if m[3] is not None:
            return _checked(model, Component(spec, (f"blocks.{layer}.attn.z.h{m[3]}",)), valid)
        return _checked(model, Component(spec, (f"blocks.{layer}.mlp.post",), (int(m[4]),)), valid)
    if m := _BLOCK.fullmatch(spec):
        return _component(model, f"L{m[1]}")
    try:
        site = Site.parse(spec)
    except MechkitError:
        raise MechkitError(f"cannot read component {spec!r}; {valid}") from None
    if site.kind == "attn.z" and site.head is not None:
        return _checked(model, Component(f"L{site.layer}.H{site.head}", (str(site),)), valid)
    if "pos" not in site.axes or "key_pos" in site.axes:
        raise MechkitError(f"component {spec!r}: {site.kind} has no position axis to ablate along; {valid}")
    return _checked(model, Component(spec, (str(site),)), valid)


def _checked(model: Any, comp: Component, valid: str) -> Component:
    for site in comp.sites:
        try:
            model.resolve(site)
        except MechkitError as err:
            raise MechkitError(f"component {comp.name!r}: {err}; {valid}") from None
    if comp.neurons is not None and model.info.d_mlp is not None and max(comp.neurons) >= model.info.d_mlp:
        raise MechkitError(f"component {comp.name!r}: the MLPs have {model.info.d_mlp} neurons; {valid}")
    return comp


# -- reference statistics ------------------------------------------------------------------------


def _reference_batch(model: Any, reference: Reference) -> Batch:
    if isinstance(reference, Batch):
        return reference
    prompts = reference.prompts if isinstance(reference, TaskSet) else list(reference)
    if not prompts:
        raise MechkitError("the reference dataset is empty; pass prompts to take means or resamples from")
    return model.tokenize(list(prompts))


def _rows(batch: Batch, rows: slice) -> Batch:
    mask = batch.attention_mask[rows]
    width = int(mask.sum(-1).max())
    return Batch(batch.input_ids[rows][:, :width], mask[:, :width])


def reference_means(model: Any, reference: Reference, sites: Sequence[str], *,
                    batch_size: int = 32) -> dict[str, Tensor]:
    """``{site: mean}`` over every real token of the reference prompts (padding excluded); each mean
    has the site's shape without its batch and position axes (``[d_head]`` for one head)."""
    batch = _reference_batch(model, reference)
    totals: dict[str, Tensor] = {}
    count = 0
    for start in range(0, batch.shape[0], batch_size):
        chunk = _rows(batch, slice(start, start + batch_size))
        cache = model.run_with_cache(chunk, list(sites)).cache
        real = chunk.attention_mask.bool()
        count += int(real.sum())
        for site in sites:
            act = cache[site]  # [batch, pos, ...]
            part = act[real].double().sum(0)
            totals[site] = totals[site] + part if site in totals else part
    return {site: (total / count).float() for site, total in totals.items()}


def ablation(model: Any, parts: str | Sequence[str] | Sequence[Component], kind: AblationKind = "mean", *,
             reference: Reference | None = None, seed: int = 0) -> dict[str, Intervention]:
    """``{site: intervention}`` that ablates ``parts`` together — pass it to ``model.run_with_interventions``
    or ``model.intervene``. ``mean`` and ``resample`` need a ``reference`` dataset."""
    comps = parts if parts and all(isinstance(p, Component) for p in parts) else components(model, parts)
    if kind not in ("zero", "mean", "resample"):
        raise MechkitError(f"kind={kind!r}: use 'zero', 'mean' or 'resample'")
    if kind != "zero" and reference is None:
        raise MechkitError(f"{kind} ablation needs reference= prompts (a TaskSet, a list of prompts or a Batch)")
    sites = _written(comps)
    if kind == "zero":
        return _interventions(comps, kind, None, seed)
    stats = reference_means(model, reference, sites) if kind == "mean" else \
        model.run_with_cache(_reference_batch(model, reference), sites).cache
    return _interventions(comps, kind, stats, seed)


def _written(comps: Sequence[Component]) -> list[str]:
    return list(dict.fromkeys(site for comp in comps for site in comp.sites))


def _interventions(comps: Sequence[Component], kind: str, stats: Any, seed: int) -> dict[str, Intervention]:
    """One intervention per written site; neuron components at one site merge into one selection.
    ``stats``: the reference means (mean) or the reference cache (resample)."""
    neurons: dict[str, set[int] | None] = {}
    for comp in comps:
        for site in comp.sites:
            if comp.neurons is None or neurons.get(site, set()) is None:
                neurons[site] = None
            else:
                neurons[site] = neurons.get(site, set()) | set(comp.neurons)
    out: dict[str, Intervention] = {}
    for site, chosen in neurons.items():
        select = {} if chosen is None else {"neurons": sorted(chosen)}
        if kind == "zero":
            out[site] = Zero(**select)
        elif kind == "mean":
            out[site] = Mean(value=stats[site], **select)
        else:
            out[site] = Resample(source=stats, seed=seed, **select)
    return out


# -- the sweep -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AblationConfig(Config):
    """How an ablation sweep runs: the keywords of :func:`ablation_sweep`."""

    components: tuple[str, ...] = option(("attn", "mlp"), help="components to ablate one at a time: 'L2.H1', "
                                         "'L2.attn', 'L2.mlp', 'L2', 'L2.N17', site names, or heads / attn / mlp "
                                         "/ layers for every one")
    kind: AblationKind = option("mean", help="zero, mean (over real tokens of the reference) or resample "
                                "(seeded reference rows)")
    metric: Literal["accuracy", "logprob", "prob"] = option("accuracy", help="score per task set, prompt-mean")
    seed: int = option(0, help="seed of the resample draws")
    batch_size: int = option(64, help="prompts per forward pass")

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if not self.components:
            raise ConfigError("components is empty: name at least one component, e.g. 'attn'")


@dataclass(frozen=True, eq=False)
class AblationResult(PatchingResult):
    """``scores`` [component, task]: the drop of the metric (unablated − ablated; positive = the component
    helps that task). ``ablated`` holds the metric with each component ablated, ``baseline`` [task] without."""

    ablated: Tensor = field(default_factory=lambda: torch.zeros(0))
    baseline: Tensor = field(default_factory=lambda: torch.zeros(0))
    kind: str = "mean"

    def table(self) -> Any:
        """One row per component (and ``none`` for the unablated model): each task's metric and its drop."""
        import pandas as pd

        tasks, comps = self.label("task"), self.label("component")
        rows = [{"component": "none", **{f"{t} {self.metric}": float(self.baseline[j]) for j, t in enumerate(tasks)},
                 **{f"{t} drop": 0.0 for t in tasks}}]
        for i, comp in enumerate(comps):
            row: dict[str, Any] = {"component": comp}
            row |= {f"{t} {self.metric}": float(self.ablated[i, j]) for j, t in enumerate(tasks)}
            row |= {f"{t} drop": float(self.scores[i, j]) for j, t in enumerate(tasks)}
            rows.append(row)
        return pd.DataFrame(rows).set_index("component")

    def hurts(self, threshold: float = 0.1) -> dict[str, list[str]]:
        """``{component: [tasks whose metric drops by more than threshold]}`` for components that hurt any."""
        tasks = self.label("task")
        out = {}
        for i, comp in enumerate(self.label("component")):
            hit = [t for j, t in enumerate(tasks) if float(self.scores[i, j]) > threshold]
            if hit:
                out[comp] = hit
        return out

    def _plot(self, fig: Any, *, title: str | None = None, **_: Any) -> None:
        """Grouped bars: per component, the drop on each task set."""
        from mechkit import viz

        comps, tasks = self.label("component"), self.label("task")
        fig.set_size_inches(max(5.0, 0.45 * len(comps) * max(1, len(tasks)) + 2.0), 3.8)
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(tasks))
        for j, task in enumerate(tasks):
            xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(comps))]
            ax.bar(xs, self.scores[:, j].tolist(), width=width, label=task)
        ax.set_xticks(range(len(comps)), comps, rotation=90 if max(map(len, comps), default=0) > 4 else 0)
        ax.axhline(0.0, color="black", linewidth=0.6)
        viz.label(ax, x="ablated component", y=f"{self.metric} drop",
                  title=title or f"{self.kind} ablation: {self.metric} drop per task")


def _task(model: Any, name: str, data: Any) -> PatchingPairs:
    if isinstance(data, TaskSet):
        prompts, answers = data.prompts, [item.answer for item in data]
    elif isinstance(data, tuple) and len(data) == 2:
        prompts, answers = list(data[0]), list(data[1])
    else:
        raise MechkitError(f"task set {name!r}: pass a TaskSet or (prompts, answers), got {type(data).__name__}")
    if not prompts or len(prompts) != len(answers):
        raise MechkitError(f"task set {name!r}: {len(prompts)} prompts and {len(answers)} answers; give one answer "
                           "per prompt")
    batch = model.tokenize(list(prompts))
    ids = torch.tensor([answer_token(model, a) if isinstance(a, str) else int(a) for a in answers])
    return PatchingPairs(batch, batch, ids, None, tuple(prompts), tuple(prompts))


def _score(model: Any, targets: PatchingPairs, metric: Any, interventions: Mapping[str, Any],
           batch_size: int) -> float:
    values = []
    for start in range(0, len(targets), batch_size):
        part = targets.select(range(start, min(start + batch_size, len(targets))))
        logits = model.run_with_interventions(part.clean, interventions, logits_at=logits_needed(model, metric)).logits
        values.append(metric(logits, part).double())
    return float(torch.cat(values).mean())


def ablation_sweep(model: Any, task_sets: Mapping[str, Any], config: AblationConfig | None = None, *,
                   reference: Reference | None = None, **options: Any) -> AblationResult:
    """Each component ablated alone, scored on every task set; ``scores`` [component, task] is the drop
    from the unablated model. ``task_sets`` maps names to TaskSets (or ``(prompts, answers)``);
    ``reference`` (default: every task set's prompts pooled, so one ablation serves all tasks) supplies
    the means and resample donors."""
    if config is not None and not isinstance(config, AblationConfig):
        raise TypeError(f"config must be an AblationConfig, got {type(config).__name__}")
    cfg = AblationConfig.from_dict(options) if config is None else config.replace(**options)
    if not task_sets:
        raise MechkitError("no task sets: pass e.g. task_sets={'recall': ..., 'reasoning': ...}")
    targets = {name: _task(model, name, data) for name, data in task_sets.items()}
    if reference is None:
        reference = [p for t in targets.values() for p in t.clean_prompts]
    metric = resolve_metric(cfg.metric)
    comps = components(model, cfg.components)
    baseline = torch.tensor([_score(model, t, metric, {}, cfg.batch_size) for t in targets.values()])
    stats = None
    if cfg.kind == "mean":
        stats = reference_means(model, reference, _written(comps), batch_size=cfg.batch_size)
    elif cfg.kind == "resample":
        stats = model.run_with_cache(_reference_batch(model, reference), _written(comps)).cache
    ablated = torch.empty(len(comps), len(targets), dtype=torch.float64)
    for i, comp in enumerate(comps):
        interventions = _interventions([comp], cfg.kind, stats, cfg.seed)
        for j, t in enumerate(targets.values()):
            ablated[i, j] = _score(model, t, metric, interventions, cfg.batch_size)
    drop = (baseline.double()[None, :] - ablated).float()
    return AblationResult(
        scores=drop, axes=("component", "task"), labels={"component": [c.name for c in comps], "task": list(targets)},
        method="ablation", metric=cfg.metric, direction="noise", normalized=False,
        n_prompts=sum(len(t) for t in targets.values()), ablated=ablated.float(), baseline=baseline.float(),
        kind=cfg.kind, config=cfg.to_dict(), provenance=provenance(model, [s for c in comps for s in c.sites]),
    )
