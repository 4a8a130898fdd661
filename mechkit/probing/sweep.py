"""Layer sweeps: one linear probe per site, all fitted in one batched optimisation.

::

    result = probe_sweep(model, tasks.concepts(400, concept="truth"), sites="blocks.*.resid_post")
    result.plot(); result.concept_depth(); result.to_frame()

The features of every site are pooled once (:mod:`mechkit.probing.features`), the splits are made
once, and the solver of :mod:`mechkit.probing.functional` fits every (site, fold) problem together,
in chunks of sites small enough to stay in cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.probing import features as feats
from mechkit.probing import functional, metrics
from mechkit.probing.checks import as_features, as_labels, encode_labels
from mechkit.probing.config import SweepConfig
from mechkit.probing.result import ProbeSweepResult
from mechkit.probing.splits import split_masks
from mechkit.provenance import provenance
from mechkit.sites import Site

CHUNK_BYTES = 8 << 20  # features of the sites solved together; more spills out of cache and runs slower


def probe_sweep(source: Any, data: Any, config: SweepConfig | None = None, *, concept: str | None = None,
                **options: Any) -> ProbeSweepResult:
    """Fit one probe per site and score it on held-out items.

    ``source``: a mechkit Model, an ActivationStore holding the dataset's prompts, or features given
    as a ``[sites, n, d]`` tensor / ``{site: [n, d]}`` mapping. ``data``: a TaskSet, a JSONL path
    (items with ``prompt`` and ``label``) or, with features given, the labels. Settings are the fields
    of :class:`SweepConfig`, as ``config=`` and/or keywords (keywords win).
    """
    cfg = _settings(config, options)
    items, labels = _dataset(data)
    sites, x = _features(source, items, cfg)
    y = as_labels(labels, x.shape[1])
    classes, index = encode_labels(y)
    groups = _meta_column(items, cfg.groups) if cfg.groups else None
    masks = split_masks(index, cfg.folds, groups=groups, seed=cfg.seed)
    scores = fit_and_score(x, index, masks, len(classes), cfg)
    control = None
    if cfg.control:
        control_y = control_labels(index, _control_types(items, cfg, len(y)), len(classes), cfg.seed)
        control = fit_and_score(x, control_y, masks, len(classes), cfg, intervals=False)["accuracy"]
    chance = float(torch.bincount(index).max()) / len(index)
    name = concept or (items.name if items is not None and hasattr(items, "name") else "concept")
    return ProbeSweepResult(
        [str(s) for s in sites], _layers(sites), scores["accuracy"], scores["f1"], scores["auroc"],
        scores["ci_low"], scores["ci_high"], scores["fold_accuracy"], control, chance, name,
        int(masks[0].sum()), int((~masks[0]).sum()), config=cfg.to_dict(),
        provenance=provenance(source if hasattr(source, "info") else None, [str(s) for s in sites], seed=cfg.seed),
    )


def fit_and_score(x: Tensor, y: Tensor, masks: Tensor, n_classes: int, cfg: SweepConfig, *,
                  intervals: bool = True) -> dict[str, Tensor]:
    """Fit every (site, fold) problem and score it: metrics ``[S]`` (and ``fold_accuracy [S, F]``)."""
    per_site = x.shape[1] * x.shape[2] * x.element_size()
    step = max(1, CHUNK_BYTES // per_site)
    parts = [_score_chunk(x[i:i + step], y, masks, n_classes, cfg) for i in range(0, x.shape[0], step)]
    fold_acc = torch.cat([p[0] for p in parts])  # [S, F]
    f1 = torch.cat([p[1] for p in parts])
    auc = torch.cat([p[2] for p in parts])
    correct = torch.cat([p[3] for p in parts])  # [S, pooled test rows]
    out = {"accuracy": fold_acc.mean(1), "f1": f1.mean(1), "auroc": auc.mean(1), "fold_accuracy": fold_acc}
    if intervals:
        out["ci_low"], out["ci_high"] = metrics.bootstrap_interval(correct, n_boot=cfg.n_boot, seed=cfg.seed)
    return out


def _score_chunk(x: Tensor, y: Tensor, masks: Tensor, n_classes: int,
                 cfg: SweepConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fit = fit_linear(x, y, masks, n_classes, cfg)
    s = functional.scores(x, fit.weight, fit.bias)  # [S, F, n, K]
    accs, f1s, aucs, correct = [], [], [], []
    for f in range(masks.shape[0]):
        test = ~masks[f]
        sf, yt = s[:, f][:, test], y[test]
        pred = (sf[..., 0] > 0).long() if sf.shape[-1] == 1 else sf.argmax(-1)
        accs.append(metrics.accuracy(pred, yt))
        f1s.append(metrics.f1(pred, yt, n_classes))
        aucs.append(metrics.auroc(sf[..., 0] if n_classes == 2 else sf, yt, n_classes))
        correct.append(pred == yt)
    return torch.stack(accs, 1), torch.stack(f1s, 1), torch.stack(aucs, 1), torch.cat(correct, 1)


def fit_linear(x: Tensor, y: Tensor, masks: Tensor, n_classes: int, cfg: SweepConfig) -> functional.LinearFit:
    if cfg.probe == "logistic":
        return functional.fit_logistic(x, y, masks, n_classes=n_classes, C=cfg.C, standardize=cfg.standardize,
                                       max_iter=cfg.max_iter)
    if cfg.probe == "ridge":
        return functional.fit_ridge(x, y, masks, n_classes=n_classes, alpha=cfg.alpha, standardize=cfg.standardize)
    return functional.fit_mean_diff(x, y, masks, n_classes=n_classes)


def control_labels(y: Tensor, types: Sequence[Any], n_classes: int, seed: int) -> Tensor:
    """Hewitt & Liang's control task: every word type gets one random label, drawn so that the
    class proportions over types follow those of the real labels."""
    index: dict[Any, int] = {}
    type_ids = torch.tensor([index.setdefault(t, len(index)) for t in types])
    g = torch.Generator().manual_seed(seed + 1)
    freq = torch.bincount(y, minlength=n_classes).double()
    per_type = torch.multinomial(freq, len(index), replacement=True, generator=g)
    if len(index) >= n_classes:  # every class appears at least once, so the control can be fitted
        per_type[torch.randperm(len(index), generator=g)[:n_classes]] = torch.arange(n_classes)
    return per_type[type_ids]


def _settings(config: SweepConfig | None, options: dict[str, Any]) -> SweepConfig:
    if config is not None and not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig, got {type(config).__name__}")
    if "sites" in options and not isinstance(options["sites"], str):
        options = {**options, "sites": ",".join(str(s) for s in options["sites"])}
    return SweepConfig.from_dict(options) if config is None else config.replace(**options)


def _dataset(data: Any) -> tuple[Any, Any]:
    from mechkit.tasks import TaskSet

    if isinstance(data, (str, Path)):
        data = TaskSet.from_jsonl(data)
    if isinstance(data, TaskSet):
        if len(data) == 0:
            raise MechkitError(f"dataset {data.name!r} is empty")
        labels = data.labels
        missing = sum(label is None for label in labels)
        if missing:
            raise MechkitError(f"{missing} of {len(data)} items of {data.name!r} have no label; "
                               "a probe needs one per item")
        return data, labels
    return None, data


def _features(source: Any, items: Any, cfg: SweepConfig) -> tuple[list[Any], Tensor]:
    position = feats.check_position(cfg.position)
    if isinstance(source, (Tensor, Mapping)):
        names, x = feats.from_tensors(source)
        return names, as_features(x.flatten(0, 1), name="features").view_as(x)
    if items is None:
        raise MechkitError("probing a model or a store needs a dataset of prompts (a TaskSet or a JSONL path)")
    if hasattr(source, "prompt_indices"):
        return feats.from_store(source, len(items), cfg.site_list, position)
    return feats.from_model(source, items.prompts, cfg.site_list, position, batch_size=cfg.batch_size,
                            progress=cfg.progress)


def _meta_column(items: Any, key: str) -> list[Any]:
    if items is None:
        raise MechkitError(f"groups={key!r} names an item meta key, but the data are bare labels")
    missing = [i for i, it in enumerate(items) if key not in it.meta]
    if missing:
        raise MechkitError(f"{len(missing)} items have no meta[{key!r}] (first: item {missing[0]})")
    return [str(it.meta[key]) for it in items]


def _control_types(items: Any, cfg: SweepConfig, n: int) -> list[Any]:
    key = cfg.control_by or cfg.groups
    if items is None:
        return list(range(n))  # no word types known: one type per item
    if key:
        return _meta_column(items, key)
    return [it.prompt.rstrip(" .?!").rsplit(" ", 1)[-1] for it in items]


def _layers(sites: list[Any]) -> list[int]:
    layers = [s.layer if isinstance(s, Site) and s.layer is not None else i for i, s in enumerate(sites)]
    return layers if len(set(layers)) == len(layers) else list(range(len(sites)))
