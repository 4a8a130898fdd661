"""Sparse autoencoders: training through sae-lens and evaluation metrics."""

from mechkit.sae.config import TrainConfig
from mechkit.sae.evaluate import EvalConfig, evaluate_sae
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
from mechkit.sae.io import LoadedSAE, SAEProvenance, load_sae, save_sae, to_inference
from mechkit.sae.result import SAEEvalResult, SAESweepResult
from mechkit.sae.source import model_activations
from mechkit.sae.sweep import sae_sweep
from mechkit.sae.train import train_sae

__all__ = [
    "EvalConfig",
    "LoadedSAE",
    "SAEEvalResult",
    "SAEProvenance",
    "SAESweepResult",
    "TrainConfig",
    "ce_loss_recovered",
    "cosine",
    "dead_fraction",
    "dense_fraction",
    "evaluate_sae",
    "explained_variance",
    "firing_frequency",
    "fvu",
    "kl_divergence",
    "l0",
    "load_sae",
    "model_activations",
    "sae_sweep",
    "save_sae",
    "to_inference",
    "train_sae",
]
