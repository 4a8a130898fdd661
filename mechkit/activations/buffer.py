"""The RAM-bounded row buffer behind ``collect``: it turns batches of rows into shards.

The buffer is one block per column, allocated once on the first batch with room for as many rows
as the budget allows, and reused for every shard. Allocating it once matters: buffering each
batch's rows as separate tensors and freeing them after every shard fragments the C heap around
the forward pass's temporaries, and the process then grows to several times the budget. Shards are
streamed from the block without concatenation; the manifest is rewritten (atomically) after every
shard, recording how many prompts complete shards cover.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.activations.shards import SHARD_PATTERN, TOKENS, ShardInfo, write_shard
from mechkit.activations.store import FORMAT, MANIFEST
from mechkit.atomic import atomic_write_json
from mechkit.errors import MechkitError, StoreError


class ShardBuffer:
    """Accumulates rows batch by batch and writes a shard before the buffer would exceed ``budget_bytes``."""

    def __init__(self, folder: Path, manifest: dict[str, Any], budget_bytes: int, token_budget: int | None) -> None:
        self.folder = folder
        self.manifest = dict(manifest)
        if "shards" not in manifest:  # a bare config: nothing on disk yet
            self.manifest |= {"d": None, "site_shapes": None, "tokens": 0, "prompts_consumed": 0,
                              "status": "partial", "shards": []}
        self.budget = budget_bytes
        self.token_budget = token_budget
        self.start = self.end = int(self.manifest["prompts_consumed"])
        self.block: dict[str, Tensor] = {}  # column → [capacity, width]
        self.capacity = 0
        self.rows = 0

    @property
    def prompts_consumed(self) -> int:
        return int(self.manifest["prompts_consumed"])

    @property
    def tokens(self) -> int:
        """Rows written plus rows buffered."""
        return int(self.manifest["tokens"]) + self.rows

    def add(self, rows: dict[str, Tensor] | None, end: int) -> bool:
        """Buffer one batch's rows (covering prompts up to ``end``; None when the batch kept no row);
        True once the token budget is reached."""
        if rows is None:
            self.end = end
            return False
        n = int(rows[TOKENS].shape[0])
        done = False
        if self.token_budget is not None and n >= self.token_budget - self.tokens:
            n, done = self.token_budget - self.tokens, True
            rows = {k: v[:n] for k, v in rows.items()}
        shapes = {k: tuple(v.shape[1:]) for k, v in rows.items()}
        rows = {k: v.reshape(n, -1) if k in self.manifest["sites"] else v for k, v in rows.items()}
        if not self.block:
            self._allocate(rows, end)
        if n > self.capacity:
            self._too_small(rows, end)
        self._describe(shapes)
        if self.rows + n > self.capacity:
            self.flush()
        for key, value in rows.items():
            self.block[key][self.rows : self.rows + n] = value
        self.rows += n
        self.end = end
        return done

    def _allocate(self, rows: dict[str, Tensor], end: int) -> None:
        row_bytes = sum(math.prod(v.shape[1:]) * v.element_size() for v in rows.values())
        self.capacity = self.budget // row_bytes
        if self.capacity < len(rows[TOKENS]):
            self._too_small(rows, end)
        # torch.empty does not touch the pages: only rows actually buffered become resident
        self.block = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in rows.items()}

    def _too_small(self, rows: dict[str, Tensor], end: int) -> None:
        n = len(rows[TOKENS])
        nbytes = sum(v.nbytes for v in rows.values())
        raise MechkitError(
            f"ram_budget_mb={self.budget / 2**20:.3g} is too small to hold one batch: prompts "
            f"{self.end}–{end - 1} give {n} rows, {nbytes / 2**20:.3g} MB; raise ram_budget_mb to at least "
            f"{math.ceil(nbytes / 2**20 * 100) / 100:g} or lower batch_size"
        )

    def _describe(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Record each site's width on the first batch of a new store; check it on later ones."""
        sites = self.manifest["sites"]
        if self.manifest["d"] is None:
            self.manifest["site_shapes"] = {s: list(shapes[s]) for s in sites}
            self.manifest["d"] = {s: math.prod(shapes[s]) for s in sites}
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / MANIFEST, self.manifest)
            return
        for s in sites:
            if list(shapes[s]) != self.manifest["site_shapes"][s]:
                raise StoreError(
                    f"{s} gives rows of shape {list(shapes[s])}, but the store holds {self.manifest['site_shapes'][s]}"
                )

    def flush(self) -> None:
        """Write the buffered rows as the next shard (atomically), then the manifest."""
        if self.rows:
            name = SHARD_PATTERN.format(len(self.manifest["shards"]))
            meta = {"format": FORMAT, "prompts": f"{self.start}-{self.end}"}
            columns = {k: [v[: self.rows]] for k, v in self.block.items()}
            size, sha = write_shard(self.folder, name, columns, meta)
            shard = ShardInfo(name, self.rows, size, sha, (self.start, self.end))
            self.manifest["shards"] = [*self.manifest["shards"], shard.to_json()]
            self.manifest["tokens"] = int(self.manifest["tokens"]) + self.rows
            self.manifest["prompts_consumed"] = self.start = self.end
            atomic_write_json(self.folder / MANIFEST, self.manifest)
        self.rows = 0

    def finish(self) -> None:
        self.flush()
        self.manifest["prompts_consumed"] = self.end
        self.manifest["status"] = "complete"
        if self.manifest["d"] is not None:
            atomic_write_json(self.folder / MANIFEST, self.manifest)
