"""The settings of one activation collection.

:class:`CollectConfig` is at once the keywords of :func:`mechkit.activations.collect.collect`, the
options of ``mechkit cache`` and the ``config`` recorded in a store's ``manifest.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from mechkit.config import Config, ConfigError, FloatDtype, dtype_name, option, torch_dtype
from mechkit.sites import Site

if TYPE_CHECKING:
    import torch

Positions = Union[Literal["all", "last"], tuple[int, ...]]


def _site_names(value: Any) -> Any:
    """Site objects → their names, so a config holds only strings."""
    items = [value] if isinstance(value, (str, Site)) else value
    if not isinstance(items, (list, tuple)):
        return value
    return [str(s) if isinstance(s, Site) else s for s in items]


@dataclass(frozen=True, kw_only=True)
class CollectConfig(Config):
    """How activations are collected into an :class:`~mechkit.activations.store.ActivationStore`."""

    sites: tuple[str, ...] = option(
        help="site names or globs to collect, e.g. blocks.*.resid_post; only sites with one vector per token",
        convert=_site_names,
    )
    positions: Positions = option(
        "all",
        help="tokens kept per prompt: 'all' real tokens, each prompt's 'last' real token, or indices among its "
        "real tokens (negative ones count from the end; indices a prompt does not reach are skipped)",
    )
    batch_size: int = option(8, help="prompts per forward pass")
    token_budget: int | None = option(None, help="stop after this many token rows (default: all prompts)")
    ram_budget_mb: float = option(
        256.0, help="RAM for activation rows waiting to be written, in MB; a shard is at most this large"
    )
    dtype: FloatDtype = option("float32", help="dtype the activations are stored in", convert=dtype_name)
    resume: bool = option(
        True, help="continue an interrupted store collected with the same settings, re-collecting damaged shards; "
        "when off, an existing store is an error"
    )
    progress: bool = option(True, help="show a progress bar")

    def check(self) -> None:
        if not self.sites:
            raise ConfigError("CollectConfig.sites is empty; name at least one site, e.g. 'blocks.0.resid_post'")
        if self.positions == ():
            raise ConfigError("CollectConfig.positions must be 'all', 'last' or a non-empty list of integers, got []")
        if self.batch_size < 1:
            raise ConfigError(f"CollectConfig.batch_size must be a positive integer, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"CollectConfig.token_budget must be a positive integer or None, got {self.token_budget}")
        if not (math.isfinite(self.ram_budget_mb) and self.ram_budget_mb > 0):
            raise ConfigError(f"CollectConfig.ram_budget_mb must be a positive number, got {self.ram_budget_mb}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


__all__ = ["CollectConfig", "Positions"]
