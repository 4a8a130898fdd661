"""The settings of the pathway monitor: the keywords of :func:`pathway_monitor`, the options of
``mechkit pathways`` and the ``config`` recorded in a :class:`PathwayMonitorResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mechkit.config import Config, ConfigError, option


@dataclass(frozen=True, kw_only=True)
class PathwayConfig(Config):
    """How memorized samples are found and their pathways measured at each checkpoint (METHODS §6)."""

    taus: tuple[float, ...] = option((0.5, 0.7, 0.8), help="cumulative router-weight thresholds of the pathway "
                                     "strings, each in (0, 1]; the monitor is reported at every one")
    epsilon: float | None = option(0.1, help="loss (nats) at or below which a sample counts as memorized; "
                                   "None: chosen so that memorized_fraction of the samples end memorized")
    memorized_fraction: float = option(0.2, help="share of training samples that end memorized when epsilon is None")
    delta: float = option(0.05, help="largest distance of a memorized sample's loss from its final loss")
    min_group: int = option(20, help="fewest memorized samples for a checkpoint to be measured and correlated")
    max_samples: int = option(300, help="memorized samples drawn (seeded) for the all-pairs pathway distance")
    level: Literal["character", "token"] = option("character", help="Levenshtein over characters or over experts")
    routing_tokens: Literal["prompt", "all"] = option("prompt", help="tokens whose routing is averaged: the "
                                                      "prompt's, or all of prompt + answer")
    center_routers: bool = option(False, help="subtract each router's mean expert row before the routing "
                                  "embeddings of the smoothness (routing is blind to it; see routing_embeddings)")
    batch_size: int = option(256, help="samples per forward pass")
    seed: int = option(0, help="seed of the sampled distance pairs")
    progress: bool = option(True, help="show a progress bar over checkpoints")

    def check(self) -> None:
        if not self.taus:
            raise ConfigError("taus is empty: give at least one threshold, e.g. 0.7")
        bad = [t for t in self.taus if not 0 < t <= 1]
        if bad:
            raise ConfigError(f"taus {bad}: each cumulative weight threshold must be in (0, 1]")
        if self.epsilon is not None and self.epsilon < 0:
            raise ConfigError(f"epsilon={self.epsilon}: a loss threshold must be non-negative")
        if not 0 < self.memorized_fraction <= 1:
            raise ConfigError(f"memorized_fraction={self.memorized_fraction}: must be in (0, 1]")
        if self.delta < 0:
            raise ConfigError(f"delta={self.delta}: must be non-negative")
        if self.min_group < 2 or self.max_samples < 2:
            raise ConfigError("min_group and max_samples must be at least 2 (a distance needs a pair)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
