"""Collect activations for a list of prompts into an on-disk :class:`ActivationStore`.

The run goes batch by batch (always the same batches: prompts ``[k·batch_size, (k+1)·batch_size)``),
keeps the real (non-padding) tokens at the requested positions, and buffers rows until the next
batch would push the buffer over the RAM budget; then the buffer becomes one shard. Shards are
cut only at batch boundaries and the manifest is rewritten after each one, so an interrupted
collection resumes from the last complete shard and produces exactly the tensors of an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.activations.buffer import ShardBuffer
from mechkit.activations.config import CollectConfig, Positions
from mechkit.activations.resume import prepare
from mechkit.activations.shards import POSITION, PROMPT, TOKENS
from mechkit.activations.store import FORMAT, FORMAT_VERSION, ActivationStore
from mechkit.errors import MechkitError
from mechkit.models.base import Model, SiteSpec
from mechkit.models.inputs import Batch
from mechkit.provenance import provenance
from mechkit.sites import Site


def collect(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]] | Tensor,
    sites: SiteSpec | None = None,
    out_dir: str | Path | None = None,
    *,
    config: CollectConfig | None = None,
    **options: Any,
) -> ActivationStore:
    """Run ``model`` over ``prompts`` and store one row per kept token and site in ``out_dir``.

    ``prompts`` are texts (needs the model's tokenizer) or token-id rows. The settings are the
    fields of :class:`CollectConfig` (which documents each one), given as ``config=``, as keyword
    ``options``, or both (options override the config; ``sites`` overrides ``config.sites``)::

        collect(model, prompts, "blocks.*.resid_post", "store/", positions="last", dtype=torch.float16)
        collect(model, prompts, out_dir="store/", config=CollectConfig.from_file("collect.yaml"))

    ``ram_budget_mb`` bounds the buffer of activation rows waiting to be written (a shard is at
    most that large). It does not cover the interpreter, the model, the transient tensors of one
    forward pass, or the one batch of rows in transit while it is copied into the buffer.

    ``resume=True`` continues an interrupted store written with the same model, backend, sites,
    positions, dtype, batch size, token budget and prompts (any of them changes the tensors), and
    re-collects from the first missing or damaged shard; ``resume=False`` refuses to touch an
    existing store. A complete, undamaged store with the same settings is returned without running
    the model.
    """
    config = _settings(sites, config, options)
    if out_dir is None:
        raise MechkitError("collect needs out_dir: the folder the ActivationStore is written to")
    rows = _normalize_prompts(prompts)
    chosen = model.resolve(list(config.sites))
    _check_per_token(chosen)
    fields = _manifest_fields(model, chosen, config, rows)
    out = Path(out_dir)
    manifest = prepare(out, fields, config.resume)
    if manifest is not None and manifest["status"] == "complete":
        return ActivationStore(out)
    buffer = ShardBuffer(out, manifest or fields, int(config.ram_budget_mb * 2**20), config.token_budget)
    _run(model, rows, chosen, config, buffer)
    return ActivationStore(out)


def _settings(sites: SiteSpec | None, config: CollectConfig | None, options: dict[str, Any]) -> CollectConfig:
    if config is not None and not isinstance(config, CollectConfig):
        raise TypeError(f"config must be a CollectConfig, got {type(config).__name__}")
    given = options if sites is None else {**options, "sites": sites}
    if config is None:
        if "sites" not in given:
            raise MechkitError(
                "collect needs sites: pass e.g. sites=['blocks.0.resid_post'], or config=CollectConfig(sites=...)"
            )
        return CollectConfig.from_dict(given)
    return config.replace(**given)


def _run(model: Model, rows: list, sites: list[Site], config: CollectConfig, buffer: ShardBuffer) -> None:
    from tqdm.auto import tqdm

    start, step, longest = buffer.prompts_consumed, config.batch_size, 0
    with tqdm(total=len(rows), initial=start, unit="prompt", desc="collect", disable=not config.progress) as bar:
        for begin in range(start, len(rows), step):
            batch = model.to_tokens(rows[begin : begin + step])
            longest = max(longest, int(batch.attention_mask.sum(-1).max()))
            b, t = select_positions(batch, config.positions)
            # no name for the rows: they must be freed before the next forward pass (the RAM budget);
            # a batch that keeps no row needs no forward pass at all
            done = buffer.add(_extract(model, batch, b, t, sites, config.torch_dtype, begin) if len(b) else None,
                              end=begin + len(batch.input_ids))
            bar.update(len(batch.input_ids))
            bar.set_postfix(tokens=buffer.tokens, refresh=False)
            if done:
                break
    if buffer.tokens == 0:
        raise MechkitError(
            f"no prompt reaches any of positions {list(config.positions)}: the longest has {longest} real tokens, "
            f"so positions run from 0 to {longest - 1} (or -1 to -{longest} from the end). Ask for positions "
            "within that range, or positions='last'"
        )
    buffer.finish()


# -- one batch ---------------------------------------------------------------------------------
def _extract(
    model: Model, batch: Batch, b: Tensor, t: Tensor, sites: list[Site], dtype: torch.dtype, begin: int
) -> dict[str, Tensor]:
    """The rows ``(b, t)`` of one batch: ``{site name: [rows, *site shape]}`` plus token/prompt/position columns."""
    _, cache = model.run_with_cache(batch, sites)
    out = {TOKENS: batch.input_ids[b, t], PROMPT: b + begin, POSITION: t}
    for site in sites:
        act = cache[site]
        if act.ndim < 2 or tuple(act.shape[:2]) != batch.shape:
            raise MechkitError(
                f"{site} has shape {tuple(act.shape)}, not [batch, pos, ...] = {list(batch.shape)}+…; "
                "the store keeps one row per token, so only per-token sites can be collected"
            )
        out[str(site)] = act[b, t].to(dtype)
    return out


def select_positions(batch: Batch, positions: Positions) -> tuple[Tensor, Tensor]:
    """(batch index, position) of every kept row, prompt by prompt; padding is never kept."""
    mask = batch.attention_mask.bool()
    if positions == "all":
        kept = mask.nonzero()
        return kept[:, 0], kept[:, 1]
    if positions == "last":
        return torch.arange(mask.shape[0]), batch.last_positions
    pairs: list[tuple[int, int]] = []
    for i, length in enumerate(mask.sum(-1).tolist()):
        chosen = dict.fromkeys(p if p >= 0 else length + p for p in positions)  # ordered, deduplicated
        pairs += [(i, p) for p in chosen if 0 <= p < length]
    if not pairs:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    index = torch.tensor(pairs, dtype=torch.long)
    return index[:, 0], index[:, 1]


# -- checks ------------------------------------------------------------------------------------
def _normalize_prompts(prompts: Any) -> list:
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.dtype.is_floating_point:
            raise TypeError(f"a prompt tensor must be integer token ids [prompts, seq], got {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            "prompts must be a list of texts or of token-id lists (a list is needed to resume), "
            f"got {type(prompts).__name__}" + (" — wrap a single prompt in a list" if isinstance(prompts, str) else "")
        )
    if len(prompts) == 0:
        raise MechkitError("no prompts to collect from: pass a non-empty list of texts or token-id lists")
    rows = [p.tolist() if isinstance(p, Tensor) else p for p in prompts]
    if all(isinstance(p, str) for p in rows):
        return list(rows)
    if all(isinstance(p, (list, tuple)) for p in rows):
        return [[int(x) for x in p] for p in rows]
    raise TypeError("prompts must be all texts or all token-id lists, not a mix")


def _check_per_token(sites: list[Site]) -> None:
    for site in sites:
        axes = site.axes
        if site.kind != "module" and (axes[:2] != ("batch", "pos") or "key_pos" in axes):
            raise MechkitError(
                f"{site} (axes {', '.join(axes)}) is not one vector per token, and the store keeps one row per "
                "token; collect it with model.run_with_cache instead"
            )


def _manifest_fields(model: Model, sites: list[Site], config: CollectConfig, rows: list) -> dict[str, Any]:
    """What the manifest records before any shard: identity, settings, provenance and config."""
    digest = hashlib.sha256()
    for row in rows:  # one prompt at a time: a long prompt list is never serialized whole
        digest.update(json.dumps(row, separators=(",", ":")).encode() + b"\n")
    record = provenance(model, sites)
    settings = config.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mechkit_version": record["mechkit_version"],
        "model": record["model"],
        "model_fingerprint": model.parameters_fingerprint(),
        "backend": record["backend"],
        "sites": record["sites"],
        "positions": settings["positions"],
        "dtype": config.dtype,  # of the stored rows; the model's own dtype is provenance["dtype"]
        "batch_size": config.batch_size,
        "token_budget": config.token_budget,
        "n_prompts": len(rows),
        "prompts_sha256": digest.hexdigest(),
        "provenance": record,
        "config": settings,
    }
