"""Per-architecture site tables, as data.

Each module in this package defines ``TABLES``: a list of :class:`ArchTable` mapping site kinds
to :class:`~mechkit.models.taps.Tap` locations for one model family. To support a new family,
add a module here and list it in ``_MODULES``; load-time verification checks every tap fires
with its declared shape.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from mechkit.errors import UnsupportedArchitectureError
from mechkit.models.taps import Tap

_MODULES = ("gpt2", "llama", "gpt_neox", "bert", "moe")


@dataclass(frozen=True)
class ArchTable:
    name: str
    model_types: tuple[str, ...]
    base_prefix: str  # attribute holding the base model in *For...LM classes
    taps: dict[str, Tap]
    # kind -> (config attribute, required value): the site exists only when it holds
    conditions: dict[str, tuple[str, object]] = field(default_factory=dict)
    encoder: bool = False
    n_ctx_key: str | None = None  # config field of the learned position table's size (None: rotary)


def all_tables() -> list[ArchTable]:
    tables: list[ArchTable] = []
    for name in _MODULES:
        tables.extend(importlib.import_module(f"{__name__}.{name}").TABLES)
    return tables


def table_for(model_type: str, class_name: str) -> ArchTable:
    for table in all_tables():
        if model_type in table.model_types:
            return table
    known = sorted(t for table in all_tables() for t in table.model_types)
    raise UnsupportedArchitectureError(
        f"no site table for model_type {model_type!r} ({class_name}). Add a module to "
        f"mechkit/models/arch/ mapping each site kind (embed, blocks.L.resid_pre, attn.q/k/v/z, ..., "
        f"logits) to a module path, or hook any submodule by path with 'module:<path>' sites. "
        f"Supported model types: {', '.join(known)}"
    )
