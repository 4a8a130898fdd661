"""The settings of SAE training: the keywords of :func:`~mechkit.sae.train_sae`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mechkit.config import Config, ConfigError, option

Architecture = Literal["topk", "standard"]
ARCHITECTURES: tuple[str, ...] = ("topk", "standard")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """How a sparse autoencoder is trained through sae-lens's SAETrainer."""

    architecture: str = option("topk", help="sae-lens architecture: 'topk' or 'standard' (ReLU + L1)")
    d_sae: int = option(1024, help="number of latents")
    k: int = option(32, help="active latents per token (topk)")
    l1_coefficient: float = option(1.0, help="weight of the L1 sparsity penalty (standard)")
    tokens: int = option(1_000_000, help="training tokens (activation rows) in total; rows are reused in epochs")
    batch_size: int = option(4096, help="activation rows per training step")
    lr: float = option(3e-4, help="Adam learning rate (constant)")
    seed: int = option(0, help="seed of the weight initialisation and the data order")
    out_dir: str | None = option(None, help="folder for sae-lens checkpoints and the final SAE (none: not saved)")
    n_checkpoints: int = option(0, help="intermediate sae-lens checkpoints written to out_dir")
    resume: bool = option(False, help="continue from the latest sae-lens checkpoint in out_dir, if any")
    progress: bool = option(True, help="show a progress bar")

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.d_sae < 1 or self.batch_size < 1:
            raise ConfigError("d_sae and batch_size must be at least 1")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"k={self.k}: must be between 1 and d_sae={self.d_sae}")
        if self.l1_coefficient < 0 or self.lr <= 0:
            raise ConfigError("l1_coefficient must be non-negative and lr positive")
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens={self.tokens} is less than one batch of {self.batch_size}")
        if self.n_checkpoints < 0 or ((self.n_checkpoints or self.resume) and self.out_dir is None):
            raise ConfigError("n_checkpoints must be non-negative; n_checkpoints and resume need out_dir")
