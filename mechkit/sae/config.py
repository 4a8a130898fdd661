"""The settings of SAE training: the keywords of :func:`~mechkit.sae.train_sae`."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

from mechkit.config import Config, ConfigError, option

Architecture = Literal["topk", "batchtopk", "matryoshka_batchtopk", "standard", "gated", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "matryoshka_batchtopk", "standard", "gated", "jumprelu")
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # sparsity set by k
L1_ARCHITECTURES = ("standard", "gated")  # sparsity set by an L1 penalty


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """How a sparse autoencoder is trained through sae-lens's SAETrainer."""

    architecture: str = option(
        "topk", help="sae-lens architecture: 'topk', 'batchtopk', 'matryoshka_batchtopk' (k active latents per "
        "token, or on average over a batch), 'standard' (ReLU + L1), 'gated' (L1) or 'jumprelu' (L0 penalty)")
    d_sae: int = option(1024, help="number of latents")
    k: int = option(32, help="active latents per token (topk), on average per token of a batch (batchtopk, "
                             "matryoshka_batchtopk)")
    l1_coefficient: float = option(1.0, help="weight of the L1 sparsity penalty (standard, gated)")
    l0_coefficient: float = option(1.0, help="weight of the L0 sparsity penalty (jumprelu)")
    matryoshka_widths: tuple[int, ...] = option(
        (), help="nested dictionary sizes of matryoshka_batchtopk, increasing; d_sae is added as the outermost "
        "level when missing (default: d_sae/16, d_sae/4, d_sae)")
    tokens: int = option(1_000_000, help="training tokens (activation rows) in total; rows are reused in epochs")
    batch_size: int = option(4096, help="activation rows per training step")
    lr: float = option(3e-4, help="Adam learning rate (constant)")
    seed: int = option(0, help="seed of the weight initialisation and the data order")
    dead_window: int = option(
        1_000_000, help="a latent not active on any of the last this many training tokens counts as dead: in the "
        "progress bar and for sae-lens's revival of dead latents (the auxiliary loss of the topk family); "
        "rounded up to whole batches; none is dead before that many tokens have been trained on")
    collect_batch_size: int = option(8, help="prompts per forward pass when activations are collected from a model")
    out_dir: str | None = option(None, help="folder for sae-lens checkpoints, the collected activations (when "
                                            "training from a model) and the final SAE (none: nothing is saved)")
    n_checkpoints: int = option(0, help="intermediate sae-lens checkpoints written to out_dir")
    resume: bool = option(False, help="continue from the latest sae-lens checkpoint in out_dir, if any")
    progress: bool = option(True, help="show a progress bar with live L0, FVU and dead fraction")

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.d_sae < 1 or self.batch_size < 1 or self.collect_batch_size < 1:
            raise ConfigError("d_sae, batch_size and collect_batch_size must be at least 1")
        if self.architecture in K_ARCHITECTURES and not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"k={self.k}: must be between 1 and d_sae={self.d_sae} for {self.architecture}")
        if self.l1_coefficient < 0 or self.l0_coefficient < 0:
            raise ConfigError("l1_coefficient and l0_coefficient must be non-negative")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr}: must be a positive number")
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens={self.tokens} is less than one batch of {self.batch_size}")
        if self.dead_window < 1:
            raise ConfigError(f"dead_window={self.dead_window}: must be at least 1 token")
        if self.n_checkpoints < 0 or ((self.n_checkpoints or self.resume) and self.out_dir is None):
            raise ConfigError("n_checkpoints must be non-negative; n_checkpoints and resume need out_dir")
        self._check_widths()

    def _check_widths(self) -> None:
        if self.matryoshka_widths and self.architecture != "matryoshka_batchtopk":
            raise ConfigError(f"matryoshka_widths applies to architecture='matryoshka_batchtopk' only, not "
                              f"{self.architecture!r}; drop it or change the architecture")
        widths = self.matryoshka_widths
        if any(w < 1 for w in widths) or any(a >= b for a, b in itertools.pairwise(widths)) or \
                (widths and widths[-1] > self.d_sae):
            raise ConfigError(f"matryoshka_widths={list(widths)}: must be positive, strictly increasing and at most "
                              f"d_sae={self.d_sae}")

    @property
    def widths(self) -> tuple[int, ...]:
        """The matryoshka levels actually trained (the outermost is always d_sae)."""
        chosen = self.matryoshka_widths or (self.d_sae // 16, self.d_sae // 4)
        inner = sorted({w for w in chosen if 1 <= w < self.d_sae})
        return (*inner, self.d_sae)

    @property
    def dead_window_steps(self) -> int:
        """``dead_window`` in training steps (sae-lens counts its window in steps)."""
        return math.ceil(self.dead_window / self.batch_size)
