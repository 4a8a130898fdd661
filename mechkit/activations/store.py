"""On-disk activation store: a folder of safetensors shards plus ``manifest.json``.

Each shard holds, for the same token rows, one ``[rows, d]`` tensor per site plus the token id,
prompt index and position of every row (so a feature can be traced back to text). The manifest
lists the shards with their size and sha256; only shards it lists are part of the store. Reads are
memory-mapped through ``safetensors.safe_open`` and load only what is asked for; the first read of a
shard in a process checks its sha256 (:mod:`mechkit.activations.integrity`). Nothing is ever
unpickled. The manifest also records the collection's ``config`` (a :class:`CollectConfig`) and its
``provenance`` (the keys of :func:`mechkit.provenance.provenance`).

Fill a store with :func:`mechkit.activations.collect.collect`.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mechkit.activations.config import CollectConfig
from mechkit.activations.integrity import REPAIR, shard_problem
from mechkit.activations.shards import POSITION, PROMPT, TOKENS, ShardInfo
from mechkit.config import torch_dtype
from mechkit.errors import MechkitError, StoreError, UnknownSiteError
from mechkit.provenance import MODEL_KEYS
from mechkit.sites import Site, nearest_names

MANIFEST = "manifest.json"
FORMAT = "mechkit.activation_store"
FORMAT_VERSION = 1  # later additions ("provenance", "config") are optional keys: every version-1 store reads
PROVENANCE_KEYS = ("mechkit_version", *MODEL_KEYS, "sites")


class ActivationStore:
    """Read access to a collected store. ``store[site]`` is a lazy :class:`Column` of ``[tokens, d]`` rows.

    ``len(store)`` is the number of token rows; ``store.token_ids``, ``store.prompt_indices`` and
    ``store.positions`` say where each row came from. The first read of each shard in a process
    checks its sha256, so damaged activations raise :class:`StoreError` instead of being served;
    ``verify=True`` checks every shard on open (see :meth:`verify`).
    """

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        self.path = Path(path)
        self._root = self.path.resolve()
        self.manifest = read_manifest(self.path)
        self.shards = [ShardInfo.from_json(s) for s in self.manifest["shards"]]
        self.sites = [Site.parse(s) for s in self.manifest["sites"]]
        self._offsets = [0]
        for shard in self.shards:
            self._offsets.append(self._offsets[-1] + shard.tokens)
        if verify:
            self.verify()

    # -- description ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are stored in (the model's own dtype is ``provenance["dtype"]``)."""
        return torch_dtype(self.manifest["dtype"])

    @property
    def provenance(self) -> dict[str, Any]:
        """What produced the store, with the keys of :func:`mechkit.provenance.provenance`.

        Stores written before provenance was recorded give None for architecture, dtype and
        attention implementation.
        """
        recorded = self.manifest.get("provenance")
        if recorded is not None:
            return dict(recorded)
        legacy = {k: self.manifest.get(k) for k in ("mechkit_version", "model", "backend", "sites")}
        return dict.fromkeys(PROVENANCE_KEYS) | legacy

    @property
    def config(self) -> CollectConfig | None:
        """The :class:`CollectConfig` of the collection (None for stores written before it was recorded)."""
        recorded = self.manifest.get("config")
        return None if recorded is None else CollectConfig.from_dict(recorded)

    @property
    def complete(self) -> bool:
        """False while a collection is still running or was interrupted (resume it with collect)."""
        return self.manifest["status"] == "complete"

    def d(self, site: str | Site) -> int:
        """Width of one row of ``site`` (trailing axes flattened; see :meth:`site_shape`)."""
        return int(self.manifest["d"][str(self._site(site))])

    def site_shape(self, site: str | Site) -> tuple[int, ...]:
        """Shape of one token's activation before flattening, e.g. ``(heads, d_head)`` for ``attn.z``."""
        return tuple(self.manifest["site_shapes"][str(self._site(site))])

    def __contains__(self, site: object) -> bool:
        try:
            return Site.parse(site) in self.sites  # type: ignore[arg-type]
        except (MechkitError, TypeError):
            return False

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}: {len(self)} tokens × {len(self.sites)} sites, "
                f"{m['dtype']}, {len(self.shards)} shards, model {m['model']!r}, {m['status']})")

    # -- columns ----------------------------------------------------------------------------
    def __getitem__(self, site: str | Site) -> Column:
        return Column(self, str(self._site(site)))

    @property
    def token_ids(self) -> Column:
        return Column(self, TOKENS)

    @property
    def prompt_indices(self) -> Column:
        return Column(self, PROMPT)

    @property
    def positions(self) -> Column:
        return Column(self, POSITION)

    def _site(self, site: str | Site) -> Site:
        parsed = Site.parse(site)
        if parsed not in self.sites:
            names = [str(s) for s in self.sites]
            raise UnknownSiteError(f"{parsed} is not in this store; {nearest_names(str(parsed), names)}")
        return parsed

    # -- shuffled training batches ----------------------------------------------------------
    def batches(
        self,
        site: str | Site,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Iterator[Tensor]:
        """One epoch of ``[batch_size, d]`` batches of ``site``; every row appears exactly once.

        With ``shuffle`` the shard order is permuted and rows are shuffled within a pool of
        ``buffer_shards`` shards at a time (memory: that many shards of this one site); the order
        depends only on ``seed`` (use ``seed + epoch`` for later epochs). The last batch may be
        smaller unless ``drop_last``.
        """
        column = self[site]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MechkitError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(buffer_shards, int) or buffer_shards < 1:
            raise MechkitError(f"buffer_shards must be a positive int, got {buffer_shards!r}")
        return _batches(column, batch_size, shuffle, seed, buffer_shards, drop_last, dtype)

    # -- integrity --------------------------------------------------------------------------
    def verify(self) -> ActivationStore:
        """Check every shard listed in the manifest (present, right size, readable, right sha256), hashing
        each again even if this process has read it before."""
        if len(self) != self.manifest.get("tokens"):
            raise StoreError(
                f"{self.path / MANIFEST} is inconsistent: its shards hold {len(self)} tokens, it records "
                f"{self.manifest.get('tokens')}; re-collect into a new folder"
            )
        for i in range(len(self.shards)):
            self._check(i, rehash=True)
        return self

    def _check(self, i: int, rehash: bool = False) -> None:
        problem = shard_problem(self._root, self.shards[i], self.manifest, rehash=rehash)
        if problem is not None:
            raise StoreError(f"shard {self.shards[i].file} in {self.path} {problem}; {REPAIR}")

    def _read(self, i: int, key: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of column ``key`` in shard ``i`` (whole column by default)."""
        self._check(i)
        shard = self.shards[i]
        try:
            with safe_open(str(self.path / shard.file), framework="pt") as f:
                if start is None and stop is None:
                    return f.get_tensor(key)
                return f.get_slice(key)[start:stop]
        except (SafetensorError, OSError, KeyError) as exc:
            raise StoreError(f"shard {shard.file} in {self.path} cannot be read ({exc}); {REPAIR}") from exc


class Column:
    """Lazy view of one column (a site, or token ids / prompt indices / positions) across all shards.

    ``len(col)``, ``col.shape``, ``col[i]``, ``col[a:b]``, ``col[index_tensor]`` read only the
    shards they need; iterating yields one tensor per shard; ``col.load()`` concatenates everything.
    """

    def __init__(self, store: ActivationStore, key: str) -> None:
        self.store = store
        self.key = key

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.key.startswith("_"):
            return (len(self),)
        return (len(self), self.store.manifest["d"][self.key])

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self.store.shards)):
            yield self.store._read(i, self.key)

    def shard(self, i: int) -> Tensor:
        return self.store._read(i, self.key)

    def load(self) -> Tensor:
        parts = list(self)
        return torch.cat(parts) if parts else self._empty()

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        n = len(self)
        if isinstance(index, numbers.Integral) or (isinstance(index, Tensor) and index.ndim == 0):
            index = int(index)
            if not -n <= index < n:
                raise IndexError(f"row {index} is out of range for a column of {n} rows")
            return self._range(index % n, index % n + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(torch.arange(start, stop, step, dtype=torch.long))
        return self._gather(torch.as_tensor(index, dtype=torch.long))

    def _range(self, start: int, stop: int) -> Tensor:
        offsets = self.store._offsets
        parts = []
        for i in range(len(self.store.shards)):
            lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
            if lo < hi:
                parts.append(self.store._read(i, self.key, lo - offsets[i], hi - offsets[i]))
        return torch.cat(parts) if parts else self._empty()

    def _gather(self, index: Tensor) -> Tensor:
        n = len(self)
        if index.ndim != 1:
            raise IndexError("index a column with an int, a slice or a 1-D sequence of row numbers")
        if index.numel() and not bool(((index >= -n) & (index < n)).all()):
            raise IndexError(f"row indices must lie in [-{n}, {n}) for a column of {n} rows")
        index = index % max(n, 1)
        offsets = torch.tensor(self.store._offsets)
        owner = torch.searchsorted(offsets, index, right=True) - 1
        out = None
        for i in owner.unique().tolist():
            hits = (owner == i).nonzero().squeeze(1)
            local = index[hits] - offsets[i]
            lo, hi = int(local.min()), int(local.max()) + 1
            rows = self.store._read(i, self.key, lo, hi)[local - lo]
            if out is None:
                out = rows.new_empty((index.numel(), *rows.shape[1:]))
            out[hits] = rows
        return out if out is not None else self._empty()

    def _empty(self) -> Tensor:
        if self.key.startswith("_"):
            return torch.empty(0, dtype=torch.long)
        return torch.empty(0, self.store.manifest["d"][self.key], dtype=self.store.dtype)


def _batches(
    column: Column, batch_size: int, shuffle: bool, seed: int, buffer_shards: int, drop_last: bool,
    dtype: torch.dtype | None,
) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n_shards = len(column.store.shards)
    order = torch.randperm(n_shards, generator=generator).tolist() if shuffle else list(range(n_shards))
    carry = column._empty()
    for g in range(0, n_shards, buffer_shards):
        pool = torch.cat([carry, *(column.shard(i) for i in order[g : g + buffer_shards])])
        if shuffle:
            pool = pool[torch.randperm(len(pool), generator=generator)]
        full = len(pool) - len(pool) % batch_size
        for start in range(0, full, batch_size):
            batch = pool[start : start + batch_size]
            yield batch if dtype is None else batch.to(dtype)
        carry = pool[full:]  # a partial batch joins the next pool, so no row is dropped mid-epoch
    if len(carry) and not drop_last:
        yield carry if dtype is None else carry.to(dtype)


def read_manifest(path: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` (a clear :class:`StoreError` otherwise)."""
    if not path.exists():
        raise StoreError(f"no ActivationStore at {path}: the folder does not exist; collect(...) creates one")
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(
            f"{path} has no {MANIFEST}, so it is not an ActivationStore (or its collection never wrote a shard); "
            "run collect(...) into it, or point to the folder that holds manifest.json"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{file} is unreadable ({exc}); restore it or re-collect into a new folder") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a mechkit activation-store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{file} has store format version {manifest.get('format_version')!r}; this mechkit reads version "
            f"{FORMAT_VERSION}. Read it with the mechkit version that wrote it (manifest 'mechkit_version': "
            f"{manifest.get('mechkit_version')!r}), or re-collect it with this one"
        )
    missing = [k for k in ("shards", "sites", "dtype", "d", "status", "model") if k not in manifest]
    if missing:
        raise StoreError(f"{file} lacks the fields {missing}; it was not written by mechkit's collect")
    return manifest
