"""Sparse autoencoders: training through sae-lens, evaluation in the model, inspection and comparison with probes."""

from mechkit.sae.compare import ProbeComparisonResult, compare_with_probes
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
from mechkit.sae.inspect import (
    FrequencyResult,
    LogitEffectsResult,
    TopContextsResult,
    activation_frequency,
    logit_effects,
    top_contexts,
)
from mechkit.sae.io import LoadedSAE, SAEProvenance, load_sae, save_sae, to_inference
from mechkit.sae.result import SAEEvalResult, SAESweepResult
from mechkit.sae.source import model_activations
from mechkit.sae.sparse_probing import (
    AbsorptionConfig,
    AbsorptionResult,
    SparseProbingResult,
    feature_absorption,
    k_sparse_probing,
)
from mechkit.sae.sweep import sae_sweep
from mechkit.sae.train import train_sae
from mechkit.sae.transcoder import TranscoderSplice, splice_transcoder

__all__ = [
    "AbsorptionConfig",
    "AbsorptionResult",
    "EvalConfig",
    "FrequencyResult",
    "LoadedSAE",
    "LogitEffectsResult",
    "ProbeComparisonResult",
    "SAEEvalResult",
    "SAEProvenance",
    "SAESweepResult",
    "SparseProbingResult",
    "TopContextsResult",
    "TrainConfig",
    "TranscoderSplice",
    "activation_frequency",
    "ce_loss_recovered",
    "compare_with_probes",
    "cosine",
    "dead_fraction",
    "dense_fraction",
    "evaluate_sae",
    "explained_variance",
    "feature_absorption",
    "firing_frequency",
    "fvu",
    "k_sparse_probing",
    "kl_divergence",
    "l0",
    "load_sae",
    "logit_effects",
    "model_activations",
    "sae_sweep",
    "save_sae",
    "splice_transcoder",
    "to_inference",
    "top_contexts",
    "train_sae",
]
