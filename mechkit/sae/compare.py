"""SAE latents against linear probes: per labelled concept, how well the best single latent classifies
it (AUROC) and how close the probe direction comes to some decoder direction, against a control of
random directions (the SAE-versus-probe comparison of METHODS §2).

Probe directions arrive as tensors or as any object with a ``.direction`` / ``.directions`` tensor
(a fitted mechkit probe, duck-typed: this package cannot import the probing package). Decoder
directions are the ones the SAE writes (:func:`mechkit.sae.directions.decoder_directions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.errors import MechkitError
from mechkit.metrics import binary_auroc
from mechkit.provenance import provenance
from mechkit.results import Result
from mechkit.sae.directions import decoder_directions

__all__ = ["ProbeComparisonResult", "as_direction", "auroc_columns", "compare_with_probes", "concepts",
           "encode_rows"]

ENCODE_CHUNK = 4096  # rows encoded at a time: bounds the [rows, d_sae] latents held at once


def encode_rows(sae: Any, features: Tensor, chunk: int = ENCODE_CHUNK) -> Tensor:
    """The SAE's latents ``[n, d_sae]`` (float32, detached) for feature rows ``[n, d_in]``."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise MechkitError(f"features must be a non-empty [n, d_in] tensor, got {got}")
    if not torch.isfinite(features).all():
        raise MechkitError("features contain NaN or infinite values")
    if not callable(getattr(sae, "encode", None)):
        raise MechkitError(f"a {type(sae).__name__} has no encode(): pass an SAE (sae-lens or encode/decode)")
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        out = [sae.encode(features[i:i + chunk].to(dtype)).float() for i in range(0, features.shape[0], chunk)]
    return torch.cat(out)


def auroc_columns(scores: Tensor, positive: Tensor, chunk: int = 256) -> Tensor:
    """ROC-AUC of each column of ``scores`` ``[n, m]`` as a score for ``positive`` ``[n]`` (bool):
    the Mann–Whitney rank statistic with ties at their average rank (equals scikit-learn's
    ``roc_auc_score``); ``[m]`` float64, computed ``chunk`` columns at a time."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MechkitError("AUROC needs both positive and negative items; this concept has only one class")
    out = [binary_auroc(scores[:, i:i + chunk].T.double(), positive)
           for i in range(0, scores.shape[1], chunk)]
    return torch.cat(out)


def as_direction(probe: Any, name: str = "probe") -> Tensor:
    """A probe's single direction ``[d]`` (float32, unit norm) from a tensor or a ``.direction`` /
    one-row ``.directions`` attribute."""
    value = probe
    if not isinstance(value, Tensor):
        try:
            value = getattr(probe, "direction", None)
        except MechkitError:  # a multiclass probe refuses .direction; .directions names its rows
            value = None
        if not isinstance(value, Tensor):
            value = getattr(probe, "directions", None)
    if not isinstance(value, Tensor):
        raise MechkitError(f"{name}: pass a direction tensor [d] or an object with a .direction / .directions "
                           f"tensor, got {type(probe).__name__}")
    value = value.detach().float()
    if value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 1:
        raise MechkitError(f"{name}: a direction is [d] (or [1, d]); got shape {tuple(value.shape)} — pass one row "
                           "per concept")
    norm = value.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise MechkitError(f"{name}: the direction is zero or not finite")
    return value / norm


def concepts(labels: Any, n: int) -> dict[str, Tensor]:
    """Labels as ``{concept: [n] bool}`` from a mapping, a ``[n]`` tensor (one concept, "concept")
    or a ``[n, C]`` tensor (concepts "0" … "C−1"); values must be 0/1 or bool."""
    if isinstance(labels, Mapping):
        items = {str(k): v for k, v in labels.items()}
    elif isinstance(labels, Tensor) and labels.dim() == 2:
        items = {str(c): labels[:, c] for c in range(labels.shape[1])}
    else:
        items = {"concept": labels}
    out = {}
    for name, y in items.items():
        y = torch.as_tensor(y)
        if y.shape != (n,) or not bool(((y == 0) | (y == 1)).all()):
            raise MechkitError(f"labels for {name!r} must be [n={n}] with values 0/1 (or bool), got shape "
                               f"{tuple(y.shape)}")
        out[name] = y.bool()
    if not out:
        raise MechkitError("no labelled concepts given")
    return out


def _probe_map(probe_directions: Any, names: Sequence[str]) -> dict[str, Tensor]:
    if isinstance(probe_directions, Mapping):
        missing = [c for c in names if c not in {str(k) for k in probe_directions}]
        if missing:
            raise MechkitError(f"no probe direction for concept(s) {missing}; give one per labelled concept")
        given = {str(k): v for k, v in probe_directions.items()}
        return {c: as_direction(given[c], f"probe for {c!r}") for c in names}
    stacked = isinstance(probe_directions, Tensor) and probe_directions.dim() == 2 and len(names) > 1
    if stacked or isinstance(probe_directions, (list, tuple)):
        rows = list(probe_directions)
    else:
        rows = [probe_directions]
    if len(rows) != len(names):
        raise MechkitError(f"{len(rows)} probe direction(s) for {len(names)} concept(s); give one per concept")
    return {c: as_direction(r, f"probe for {c!r}") for c, r in zip(names, rows)}


def random_control(unit_decoder: Tensor, n_draws: int, seed: int) -> Tensor:
    """Max |cosine| to the decoder directions of ``n_draws`` random unit directions (``[n_draws]``)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(n_draws, unit_decoder.shape[1], generator=g, dtype=torch.float64)
    draws = draws / draws.norm(dim=1, keepdim=True)
    return (draws @ unit_decoder.double().T).abs().max(1).values


def compare_with_probes(sae: Any, features: Tensor, labels: Any, probe_directions: Any, *, seed: int = 0,
                        n_random: int = 64, quantile: float = 0.95) -> ProbeComparisonResult:
    """Per labelled concept: the best single latent as a classifier and the probe's nearest decoder direction.

    ``features`` ``[n, d_in]`` are the site's activations, ``labels`` the concepts (see :func:`concepts`),
    ``probe_directions`` one direction per concept (a mapping by name, a list, a ``[C, d_in]`` tensor, or
    probe objects). AUROC is taken two ways over all latents, the best kept: the activation as a score,
    and the binary "active" (activation > 0). The random control is the same max |cosine| for ``n_random``
    random unit directions (seeded): a probe direction whose max cosine does not clear the control's
    ``quantile`` has no decoder direction closer than chance.
    """
    if not 0 < quantile < 1 or n_random < 2:
        raise MechkitError("quantile must be in (0, 1) and n_random at least 2")
    z = encode_rows(sae, features)
    named = concepts(labels, features.shape[0])
    probes = _probe_map(probe_directions, list(named))
    decoder = decoder_directions(sae).float()
    if decoder.shape[1] != features.shape[1]:
        raise MechkitError(f"the SAE writes {decoder.shape[1]}-d directions but the features are "
                           f"{features.shape[1]}-d; pass the activations of the SAE's site")
    unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    active = (z > 0).double()
    best: dict[str, list[tuple[float, int]]] = {"score": [], "active": [], "cos": []}
    for name, y in named.items():
        if probes[name].shape[0] != unit.shape[1]:
            raise MechkitError(f"probe for {name!r} is {probes[name].shape[0]}-d; the features are {unit.shape[1]}-d")
        # a binary score's AUROC is (TPR − FPR + 1) / 2: the rank statistic with one tie group per value
        candidates = {"score": auroc_columns(z, y), "active": (active[y].mean(0) - active[~y].mean(0) + 1) / 2,
                      "cos": (unit @ probes[name]).abs()}
        for key, values in candidates.items():
            i = int(values.argmax())
            best[key].append((float(values[i]), i))

    def column(key: str, part: int) -> Tensor:
        return torch.tensor([b[part] for b in best[key]], dtype=torch.float64 if part == 0 else torch.long)

    control = random_control(unit, n_random, seed)
    return ProbeComparisonResult(
        concepts=list(named), auroc=column("score", 0), best_latent=column("score", 1),
        auroc_active=column("active", 0), best_latent_active=column("active", 1),
        max_cosine=column("cos", 0), cosine_latent=column("cos", 1),
        random_cosine=control.float(), random_mean=float(control.mean()),
        random_quantile=float(control.quantile(quantile)), quantile=quantile, n_items=features.shape[0],
        config={"seed": seed, "n_random": n_random, "quantile": quantile}, provenance=provenance(seed=seed),
    )


@dataclass(frozen=True, eq=False)
class ProbeComparisonResult(Result):
    """SAE latents against probes, one entry per concept (tensors are ``[n_concepts]``).

    ``auroc`` / ``best_latent``: the best latent with its activation as the score; ``auroc_active`` /
    ``best_latent_active``: the best with "active" (> 0) as the prediction; ``max_cosine`` /
    ``cosine_latent``: the largest |cos| between the probe direction and a decoder direction;
    ``random_cosine``: the same for each random unit direction (``[n_random]``), summarised by
    ``random_mean`` and ``random_quantile`` (at ``quantile``).
    """

    concepts: list[str]
    auroc: Tensor
    best_latent: Tensor
    auroc_active: Tensor
    best_latent_active: Tensor
    max_cosine: Tensor
    cosine_latent: Tensor
    random_cosine: Tensor
    random_mean: float
    random_quantile: float
    quantile: float
    n_items: int

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame({
            "concept": self.concepts, "auroc": self.auroc.tolist(), "best_latent": self.best_latent.tolist(),
            "auroc_active": self.auroc_active.tolist(), "best_latent_active": self.best_latent_active.tolist(),
            "max_cosine": self.max_cosine.tolist(), "cosine_latent": self.cosine_latent.tolist(),
            "random_mean": self.random_mean, "random_quantile": self.random_quantile,
            "above_control": (self.max_cosine > self.random_quantile).tolist(),
        })

    def _plot(self, fig: Any) -> None:
        fig.set_size_inches(max(6.0, 0.6 * len(self.concepts) + 4), 3.6)
        x = list(range(len(self.concepts)))
        ax = fig.add_subplot(1, 2, 1)
        ax.bar([i - 0.2 for i in x], self.auroc.tolist(), width=0.4, label="activation", color="C0")
        ax.bar([i + 0.2 for i in x], self.auroc_active.tolist(), width=0.4, label="active > 0", color="C1")
        ax.axhline(0.5, color="gray", lw=0.8)
        ax.set_xticks(x, self.concepts, rotation=45, ha="right", fontsize="small")
        viz.label(ax, y="best latent's AUROC", title="Best single latent")
        ax = fig.add_subplot(1, 2, 2)
        ax.bar(x, self.max_cosine.tolist(), color="C0", label="probe")
        ax.axhspan(self.random_mean, self.random_quantile, color="gray", alpha=0.3,
                   label=f"random (mean – q{self.quantile:g})")
        ax.set_xticks(x, self.concepts, rotation=45, ha="right", fontsize="small")
        viz.label(ax, y="max |cos| to a decoder direction", title="Probe vs decoder")
