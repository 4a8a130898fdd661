"""Patching: activation, path and attribution patching on clean/corrupt prompt pairs."""

from mechkit.patching.ablation import (
    AblationConfig,
    AblationResult,
    Component,
    ablation,
    ablation_sweep,
    components,
    reference_means,
)
from mechkit.patching.activation import activation_patching
from mechkit.patching.attribution import (
    NODE_SITES,
    AttributionConfig,
    AttributionCorrelation,
    attribution_correlation,
    attribution_nodes,
    attribution_patching,
)
from mechkit.patching.config import PatchConfig
from mechkit.patching.metrics import (
    accuracy,
    answer_logprob,
    answer_prob,
    kl_to,
    last_logits,
    logit_diff,
    recovery,
)
from mechkit.patching.pairs import PatchingPairs, answer_token, make_pairs
from mechkit.patching.path import PathPatchingConfig, path_patching
from mechkit.patching.relevance import relevance_rules
from mechkit.patching.result import PatchingResult

__all__ = [
    "NODE_SITES",
    "AblationConfig",
    "AblationResult",
    "AttributionConfig",
    "AttributionCorrelation",
    "Component",
    "PatchConfig",
    "PatchingPairs",
    "PatchingResult",
    "PathPatchingConfig",
    "ablation",
    "ablation_sweep",
    "accuracy",
    "activation_patching",
    "answer_logprob",
    "answer_prob",
    "answer_token",
    "attribution_correlation",
    "attribution_nodes",
    "attribution_patching",
    "components",
    "kl_to",
    "last_logits",
    "logit_diff",
    "make_pairs",
    "path_patching",
    "recovery",
    "reference_means",
    "relevance_rules",
]
