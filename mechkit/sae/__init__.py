"""Sparse autoencoders: training through sae-lens and evaluation metrics."""

from mechkit.sae.config import TrainConfig
from mechkit.sae.evaluate import ce_recovered
from mechkit.sae.functional import (
    ce_loss_recovered,
    cosine,
    dead_fraction,
    dense_fraction,
    explained_variance,
    firing_frequency,
    fvu,
    kl_divergence,
    l0,
)
from mechkit.sae.train import train_sae

__all__ = [
    "TrainConfig",
    "ce_loss_recovered",
    "ce_recovered",
    "cosine",
    "dead_fraction",
    "dense_fraction",
    "explained_variance",
    "firing_frequency",
    "fvu",
    "kl_divergence",
    "l0",
    "train_sae",
]
