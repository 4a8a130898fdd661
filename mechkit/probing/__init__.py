"""Probes: linear layer sweeps and concept depth, attentive probes, hyperdimensional probes."""

from mechkit.probing.attentive import AttentionProbe, AttentiveProbe, EfficientProbe
from mechkit.probing.config import SweepConfig
from mechkit.probing.features import sequences
from mechkit.probing.linear import LinearProbe, LogisticProbe, MeanDiffProbe, RidgeProbe
from mechkit.probing.metrics import ConceptDepth, concept_depth
from mechkit.probing.result import ProbeSweepResult
from mechkit.probing.sweep import probe_sweep

__all__ = [
    "AttentionProbe",
    "AttentiveProbe",
    "ConceptDepth",
    "EfficientProbe",
    "LinearProbe",
    "LogisticProbe",
    "MeanDiffProbe",
    "ProbeSweepResult",
    "RidgeProbe",
    "SweepConfig",
    "concept_depth",
    "probe_sweep",
    "sequences",
]
