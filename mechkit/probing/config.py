"""The settings of a linear probe sweep: the keywords of :func:`probe_sweep`, the options of
``mechkit probe`` and the ``config`` recorded in a :class:`ProbeSweepResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from mechkit.config import Config, ConfigError, option

Position = Union[Literal["last", "mean"], int]
ProbeKind = Literal["logistic", "ridge", "mean_diff"]


@dataclass(frozen=True, kw_only=True)
class SweepConfig(Config):
    """How a concept is probed at each site."""

    sites: str = option("blocks.*.resid_post", help="sites to probe (a glob or a comma-separated list), one probe each")
    position: Position = option("last", help="'last' real token, 'mean' over real tokens, or an int among real tokens")
    probe: ProbeKind = option("logistic", help="logistic (L2), ridge (±1 targets) or mean_diff (class means)")
    split: float = option(0.6, help="training fraction of one stratified hold-out (< 1), or k ≥ 2 for k folds")
    groups: str | None = option(None, help="item meta key whose values must not straddle train and test "
                                "(e.g. 'group' for paired statements)")
    C: float = option(1.0, help="inverse L2 strength of the logistic probe (scikit-learn's C)")
    alpha: float = option(1.0, help="L2 strength of the ridge probe")
    standardize: bool = option(True, help="standardise features on each training fold (logistic, ridge)")
    control: bool = option(True, help="also fit a control task (random labels per word type) for selectivity")
    control_by: str | None = option(None, help="item meta key that defines the control task's word types "
                                    "(default: the groups key, else the prompt's last word)")
    n_boot: int = option(1000, help="bootstrap resamples for the confidence intervals")
    seed: int = option(42, help="seed of the split, the control labels and the bootstrap")
    batch_size: int = option(32, help="prompts per forward pass")
    max_iter: int = option(500, help="iterations of the logistic solver")
    progress: bool = option(True, help="show progress bars")

    def check(self) -> None:
        if self.split >= 1 and (self.split != int(self.split) or self.split < 2):
            raise ConfigError(f"split={self.split}: give a training fraction in (0, 1) or an integer number "
                              "of folds ≥ 2")
        if self.split <= 0:
            raise ConfigError(f"split={self.split}: must be positive")
        if self.C <= 0 or self.alpha < 0:
            raise ConfigError("C must be positive and alpha non-negative")
        if self.n_boot < 10:
            raise ConfigError(f"n_boot={self.n_boot}: use at least 10 bootstrap resamples")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")

    @property
    def folds(self) -> float | int:
        """The split as :func:`~mechkit.probing.splits.split_masks` takes it."""
        return int(self.split) if self.split >= 1 else float(self.split)

    @property
    def site_list(self) -> str | list[str]:
        parts = [s.strip() for s in self.sites.split(",") if s.strip()]
        return parts[0] if len(parts) == 1 else parts
