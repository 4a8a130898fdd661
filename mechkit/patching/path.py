"""Path patching (Wang et al.): how much of a corruption's effect flows from sender heads into chosen receivers.

For a sender head (l, h): (1) run the clean prompts with the sender's ``z`` at the chosen positions
taken from the corrupt run and every other head's ``z`` frozen to its clean value (MLP outputs too
with ``freeze_mlps``), caching the receivers' inputs; (2) run the clean prompts again, patching only
those receiver inputs. Score = (m_patched − m_clean) / (m_corrupt − m_clean). A receiver is
``"logits"`` (the final residual stream: step 2 reproduces step 1's logits exactly, so step 1's are
read directly), or the q / k / v inputs (``attn.q_in`` / ``k_in`` / ``v_in``, or the projected
``attn.q`` / ``k`` / ``v``, equivalent here since each is a function of that head's input alone) or
the ``attn.z`` of given heads; a receiver head's own ``z`` is left free in step 1. Join sites with
``+`` to patch them together as one receiver set. Cells where the sender cannot reach the receiver
(it sits in the same or a later layer) are NaN.

Senders share forward passes: each row of a batch holds one (sender, prompt) variant, and step 2
stacks every receiver of the sweep the same way, with per-row head masks choosing what each row
patches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from mechkit.config import Config, ConfigError, option
from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.models.inputs import Batch
from mechkit.patching.metrics import logits_needed, recovery, resolve_metric
from mechkit.patching.pairs import PatchingPairs
from mechkit.patching.result import PatchingResult
from mechkit.provenance import provenance
from mechkit.selection import RunContext, position_mask
from mechkit.sites import Site

__all__ = ["PathPatchingConfig", "path_patching"]

Positions = Union[Literal["real", "last"], int, tuple[int, ...]]
RECEIVER_KINDS = ("attn.q_in", "attn.k_in", "attn.v_in", "attn.q", "attn.k", "attn.v", "attn.z")
Head = tuple[int, int]


def _sender_names(value: Any) -> Any:
    """``(3, 2)`` → ``"L3.H2"``, element-wise; strings pass through."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = [value]
    return [f"L{v[0]}.H{v[1]}" if isinstance(v, (tuple, list)) else v for v in value]


def _receiver_names(value: Any) -> Any:
    """A nested list of sites is one receiver set, written joined by ``+``."""
    if isinstance(value, str):
        return [value]
    return ["+".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v) for v in value]


@dataclass(frozen=True, kw_only=True)
class PathPatchingConfig(Config):
    """How a path-patching sweep runs: the keywords of :func:`path_patching`."""

    senders: Union[tuple[str, ...], None] = option(
        None, help="sender heads: 'L3.H2', 'blocks.3.attn.z.h2' or (3, 2); 'L3' or 'blocks.3.attn.z' for every "
        "head of layer 3; default every head", convert=_sender_names)
    receivers: tuple[str, ...] = option(
        ("logits",), help="receiver sets, one score column each: 'logits', or sites such as 'blocks.3.attn.q_in.h1' "
        "(q_in/k_in/v_in, q/k/v or z; without .hN every head of the layer); join sites with '+' to patch them "
        "together", convert=_receiver_names)
    positions: Positions = option("real", help="sender positions whose z comes from the corrupt run, counted among "
                                  "real tokens: 'real' (all), 'last', an int or a list of ints")
    receiver_positions: Positions = option("real", help="positions at which receiver inputs are patched in step 2")
    freeze_mlps: bool = option(False, help="also freeze every MLP output to its clean value in step 1, so only "
                               "paths through attention reach the receivers")
    metric: str = option("logit_diff", help="metric name (logit_diff, logprob, prob, accuracy); a function "
                         "metric(logits, targets) -> [batch] may be passed to path_patching instead")
    normalize: bool = option(True, help="report (m_patched − m_clean) / (m_corrupt − m_clean) rather than the "
                             "raw prompt-mean metric")
    batch_size: int = option(64, help="rows per forward pass; each row is one (sender, receiver, prompt) variant")

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if not self.receivers:
            raise ConfigError("receivers is empty: name at least one receiver, e.g. 'logits'")
        if self.senders is not None and not self.senders:
            raise ConfigError("senders is empty: name sender heads or leave senders unset for every head")


@dataclass(frozen=True)
class _Receiver:
    label: str
    sites: tuple[Site, ...]  # empty for the logits

    @property
    def free(self) -> frozenset[Head]:
        """Receiver heads whose own z must not be frozen in step 1 (z receivers)."""
        return frozenset((s.layer, s.head) for s in self.sites if s.kind == "attn.z" and s.head is not None)

    @property
    def free_layers(self) -> frozenset[int]:
        return frozenset(s.layer for s in self.sites if s.kind == "attn.z" and s.head is None)

    def reached_by(self, sender: Head) -> bool:
        if sender in self.free or sender[0] in self.free_layers:
            return False
        return not self.sites or any(s.layer > sender[0] for s in self.sites)


def path_patching(model: Any, pairs: PatchingPairs, config: PathPatchingConfig | None = None,
                  **options: Any) -> PatchingResult:
    """Sender × receiver path-patching scores (see the module docstring); the keywords are the fields
    of :class:`PathPatchingConfig`, and ``metric`` may also be a function ``metric(logits, targets)``."""
    metric_fn, cfg = _settings(config, options)
    if not isinstance(pairs, PatchingPairs):
        raise MechkitError("path_patching takes PatchingPairs: build them with mechkit.patching.make_pairs")
    senders, receivers = resolve_senders(model, cfg.senders), resolve_receivers(model, cfg.receivers)
    n_layers = model.info.n_layers
    z_sites = [f"blocks.{layer}.attn.z" for layer in range(n_layers)]
    mlp_sites = [f"blocks.{layer}.mlp.out" for layer in range(n_layers)] if cfg.freeze_mlps else []
    clean = model.run_with_cache(pairs.clean, z_sites + mlp_sites)
    corrupt = model.run_with_cache(pairs.corrupt, z_sites)
    m_clean, m_corrupt = _mean_metric(metric_fn, clean.logits, pairs), _mean_metric(metric_fn, corrupt.logits, pairs)
    recovery(m_clean, m_clean, m_corrupt, direction="noise")  # no effect to explain: fail before the sweep
    sweep = _Sweep(model, pairs, cfg, metric_fn, clean.cache, corrupt.cache)
    patched = torch.full((len(senders), len(receivers)), float("nan"), dtype=torch.float64)
    for group in _groups(receivers):
        sweep.run_group(senders, receivers, group, patched)
    valid = ~torch.isnan(patched)
    scores = patched
    if cfg.normalize and bool(valid.any()):
        normalized = recovery(torch.nan_to_num(patched), m_clean, m_corrupt, direction="noise")
        scores = torch.where(valid, normalized, torch.full_like(normalized, float("nan")))
    return PatchingResult(
        scores=scores.float(), axes=("sender", "receiver"),
        labels={"sender": [f"L{l}.H{h}" for l, h in senders], "receiver": [r.label for r in receivers]},
        method="path", metric=_metric_name(cfg, metric_fn), direction="noise", normalized=cfg.normalize,
        clean=float(m_clean), corrupt=float(m_corrupt), n_prompts=len(pairs), config=cfg.to_dict(),
        provenance=provenance(model, z_sites + mlp_sites),
    )


class _Sweep:
    """The two steps of path patching for chunks of senders, every row one variant."""

    def __init__(self, model: Any, pairs: PatchingPairs, cfg: PathPatchingConfig, metric: Callable[..., Tensor],
                 clean: Any, corrupt: Any) -> None:
        self.model, self.pairs, self.cfg, self.metric = model, pairs, cfg, metric
        self.clean, self.corrupt = clean, corrupt

    def run_group(self, senders: list[Head], receivers: list[_Receiver], group: list[int], out: Tensor) -> None:
        """Fill ``out[sender, receiver]`` (raw prompt-mean metric) for the receivers in ``group``, which
        share one step 1 (the same free heads)."""
        todo = [i for i, s in enumerate(senders) if any(receivers[j].reached_by(s) for j in group)]
        later = [j for j in group if receivers[j].sites]
        n = len(self.pairs)
        chunk = max(1, self.cfg.batch_size // (n * max(1, len(later))))
        free = receivers[group[0]]
        for start in range(0, len(todo), chunk):
            rows = todo[start : start + chunk]
            logits, cache = self._step1([senders[i] for i in rows], free, [receivers[j] for j in later])
            means = self._scores(logits, len(rows))
            for j in group:
                if not receivers[j].sites:
                    self._fill(out, rows, j, means, senders, receivers[j])
            if later:
                means = self._scores(self._step2(cache, [receivers[j] for j in later], len(rows)),
                                     len(rows) * len(later)).reshape(len(later), len(rows))
                for k, j in enumerate(later):
                    self._fill(out, rows, j, means[k], senders, receivers[j])

    @staticmethod
    def _fill(out: Tensor, rows: list[int], j: int, values: Tensor, senders: list[Head], receiver: _Receiver) -> None:
        for k, i in enumerate(rows):
            if receiver.reached_by(senders[i]):
                out[i, j] = values[k]

    def _repeat(self, batch: Batch, times: int) -> Batch:
        return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1))

    def _step1(self, chunk: list[Head], free: _Receiver, later: list[_Receiver]) -> tuple[Tensor, Any]:
        """Clean run, sender z from the corrupt run, everything else frozen; caches receiver inputs."""
        n, s = len(self.pairs), len(chunk)
        batch = self._repeat(self.pairs.clean, s)
        senders_at = position_mask(self.cfg.positions, RunContext(batch.attention_mask))  # [s * n, pos]
        first = min(layer for layer, _ in chunk)
        writes: dict[str, Any] = {}
        for layer in range(first, self.model.info.n_layers):
            site = f"blocks.{layer}.attn.z"
            source = self.clean[site].repeat(s, 1, 1, 1)
            for k, (sl, sh) in enumerate(chunk):
                if sl == layer:
                    rows = slice(k * n, (k + 1) * n)
                    where = senders_at[rows, :, None]
                    source[rows, :, sh] = torch.where(where, self.corrupt[site][:, :, sh], source[rows, :, sh])
            frozen = torch.ones(source.shape[2], dtype=torch.bool)
            if layer in free.free_layers:
                frozen[:] = False
            for fl, fh in free.free:
                frozen[fh] = frozen[fh] and fl != layer
            writes[site] = Replace(source=source, heads=frozen)
            if self.cfg.freeze_mlps:
                mlp = f"blocks.{layer}.mlp.out"
                writes[mlp] = Replace(source=self.clean[mlp].repeat(s, 1, 1))
        reads = sorted({str(site.base) for r in later for site in r.sites})
        return self.model.run_with_interventions(batch, writes, cache=reads or None)

    def _step2(self, cache: Any, later: list[_Receiver], s: int) -> Tensor:
        """Clean run patching only each row's receiver inputs with their step-1 values."""
        n, r = len(self.pairs), len(later)
        batch = self._repeat(self.pairs.clean, s * r)
        block = s * n
        writes: dict[str, Any] = {}
        for base in sorted({str(site.base) for rec in later for site in rec.sites}):
            source = cache[base]
            heads = torch.zeros(block * r, source.shape[2], dtype=torch.bool)
            for k, rec in enumerate(later):
                for site in rec.sites:
                    if str(site.base) == base:
                        chosen = slice(None) if site.head is None else site.head
                        heads[k * block : (k + 1) * block, chosen] = True
            writes[base] = Replace(source=source.repeat(r, 1, 1, 1), heads=heads,
                                   positions=self.cfg.receiver_positions)
        return self.model.run_with_interventions(batch, writes, logits_at=logits_needed(self.model, self.metric)).logits

    def _scores(self, logits: Tensor, variants: int) -> Tensor:
        """``[variants]`` prompt-mean metric of a batch that stacks ``variants`` copies of the pairs."""
        n = len(self.pairs)
        targets = self.pairs.select(torch.arange(n).repeat(variants))
        values = self.metric(logits, targets).double()
        if values.shape != (variants * n,):
            raise MechkitError(f"the metric returned shape {tuple(values.shape)}; return one value per row "
                               f"([{variants * n}])")
        if not bool(torch.isfinite(values).all()):
            raise MechkitError("the metric returned NaN or infinite values on a patched run; check the metric")
        return values.reshape(variants, n).mean(-1)


def _groups(receivers: list[_Receiver]) -> list[list[int]]:
    """Receivers that share one step 1: those with the same free (unfrozen) heads."""
    groups: dict[tuple, list[int]] = {}
    for j, r in enumerate(receivers):
        groups.setdefault((r.free, r.free_layers), []).append(j)
    return list(groups.values())


def _settings(config: PathPatchingConfig | None, options: dict[str, Any]) -> tuple[Callable[..., Tensor],
                                                                                   PathPatchingConfig]:
    if config is not None and not isinstance(config, PathPatchingConfig):
        raise TypeError(f"config must be a PathPatchingConfig, got {type(config).__name__}")
    metric = options.pop("metric", None)
    if isinstance(metric, str):
        options["metric"] = metric
    cfg = PathPatchingConfig.from_dict(options) if config is None else config.replace(**options)
    fn = metric if callable(metric) else resolve_metric(cfg.metric)
    return fn, cfg


def _metric_name(cfg: PathPatchingConfig, fn: Callable[..., Tensor]) -> str:
    return cfg.metric if fn is resolve_metric(cfg.metric) else getattr(fn, "__name__", "custom")


def _mean_metric(metric: Callable[..., Tensor], logits: Tensor, pairs: PatchingPairs) -> Tensor:
    values = metric(logits, pairs)
    if not bool(torch.isfinite(values).all()):
        raise MechkitError("the metric returned NaN or infinite values; check the answer tokens and the metric")
    return values.double().mean()


# -- naming senders and receivers ------------------------------------------------------------------

_HEAD_RE = (re.compile(r"L(\d+)\.H(\d+)"), re.compile(r"blocks\.(\d+)\.attn\.z\.h(\d+)"))
_LAYER_RE = (re.compile(r"L(\d+)"), re.compile(r"blocks\.(\d+)\.attn\.z"))


def resolve_senders(model: Any, names: Sequence[str] | None) -> list[Head]:
    """Sender names → (layer, head) pairs in the given order, without repeats."""
    n_layers, n_heads = model.info.n_layers, model.info.n_heads
    if not any(s.kind == "attn.z" for s in model.sites):
        raise MechkitError(f"{model.info.name} exposes no attn.z sites with the {model.backend} backend; path "
                           "patching needs per-head outputs")
    if names is None:
        return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    heads: dict[Head, None] = {}
    for name in _sender_names(names):
        heads.update(dict.fromkeys(_one_sender(str(name).strip(), n_layers, n_heads)))
    return list(heads)


def _one_sender(name: str, n_layers: int, n_heads: int) -> list[Head]:
    valid = (f"senders are heads 'L<layer>.H<head>' or 'blocks.<layer>.attn.z.h<head>' with layer 0–{n_layers - 1} "
             f"and head 0–{n_heads - 1} (e.g. 'L{n_layers - 1}.H0'), or 'L<layer>' / 'blocks.<layer>.attn.z' for "
             "every head of a layer")
    for pattern in _HEAD_RE:
        if m := pattern.fullmatch(name):
            layer, head = int(m[1]), int(m[2])
            if layer < n_layers and head < n_heads:
                return [(layer, head)]
            raise MechkitError(f"sender {name!r} does not exist in this model; {valid}")
    for pattern in _LAYER_RE:
        if m := pattern.fullmatch(name):
            if int(m[1]) < n_layers:
                return [(int(m[1]), head) for head in range(n_heads)]
            raise MechkitError(f"sender {name!r} does not exist in this model; {valid}")
    raise MechkitError(f"cannot read sender {name!r}; {valid}")


def resolve_receivers(model: Any, names: Sequence[str]) -> list[_Receiver]:
    """Receiver names (``+`` joins sites into one set) → receivers checked against the model."""
    have = {str(s) for s in model.sites}
    kinds = [k for k in RECEIVER_KINDS if f"blocks.0.{k}" in have]
    last = model.info.n_layers - 1
    valid = ("valid receivers: 'logits', or " + ", ".join(f"'blocks.<layer>.{k}[.h<head>]'" for k in kinds)
             + f" with layer 0–{last}")
    out = []
    for name in _receiver_names(names):
        parts = [p.strip() for p in str(name).split("+") if p.strip()]
        if parts == ["logits"]:
            out.append(_Receiver("logits", ()))
            continue
        sites = tuple(_receiver_site(model, part, have, valid) for part in parts)
        if not sites:
            raise MechkitError(f"empty receiver {name!r}; {valid}")
        out.append(_Receiver("+".join(map(str, sites)), sites))
    return out


def _receiver_site(model: Any, part: str, have: set[str], valid: str) -> Site:
    if part == "logits":
        raise MechkitError("'logits' is a receiver on its own; do not join it with other sites")
    try:
        site = Site.parse(part)
    except MechkitError as err:
        raise MechkitError(f"cannot read receiver {part!r} ({err}); {valid}") from None
    if site.kind not in RECEIVER_KINDS:
        raise MechkitError(f"{part!r} is not a receiver input; {valid}")
    if str(site.base) not in have:
        hint = ""
        if site.kind.endswith("_in"):
            hint = (f" ({site.kind} is not available with the {model.backend} backend; 'attn.{site.kind[5]}' "
                    "gives the same path-patching scores)")
        raise MechkitError(f"this model has no receiver {part!r}{hint}; {valid}")
    try:
        model.resolve(site)
    except MechkitError as err:
        raise MechkitError(f"receiver {part!r}: {err}; {valid}") from None
    return site
