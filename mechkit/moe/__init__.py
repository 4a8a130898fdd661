"""MoE routing pathways: pathway strings, distance, consistency (smoothness / complexity), entropy."""

from mechkit.moe.functional import (
    complexity,
    layer_cosines,
    mean_pathway_distance,
    pathway_distance,
    pathway_strings,
    routing_embeddings,
    routing_entropy,
    sample_routing,
    smoothness,
)

__all__ = [
    "complexity",
    "layer_cosines",
    "mean_pathway_distance",
    "pathway_distance",
    "pathway_strings",
    "routing_embeddings",
    "routing_entropy",
    "sample_routing",
    "smoothness",
]
