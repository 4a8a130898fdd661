"""Probes: linear layer sweeps and concept depth, attentive probes, hyperdimensional probes."""

from mechkit.probing.attentive import AttentionProbe, AttentiveProbe, EfficientProbe
from mechkit.probing.config import SweepConfig
from mechkit.probing.features import sequences
from mechkit.probing.hyperdimensional import Codebook, HyperdimensionalProbe, compress_layers, decode
from mechkit.probing.linear import LinearProbe, LogisticProbe, MeanDiffProbe, RidgeProbe
from mechkit.probing.metrics import ConceptDepth, concept_depth
from mechkit.probing.result import ProbeSweepResult
from mechkit.probing.sweep import probe_sweep

__all__ = [
    "AttentionProbe",
    "AttentiveProbe",
    "Codebook",
    "ConceptDepth",
    "EfficientProbe",
    "HyperdimensionalProbe",
    "LinearProbe",
    "LogisticProbe",
    "MeanDiffProbe",
    "ProbeSweepResult",
    "RidgeProbe",
    "SweepConfig",
    "compress_layers",
    "concept_depth",
    "decode",
    "probe_sweep",
    "sequences",
]
