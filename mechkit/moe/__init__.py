"""MoE routing pathways: routing capture, pathway strings, distance, consistency (smoothness /
complexity), entropy."""

from mechkit.moe.capture import RoutingTrace, capture_routing
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
    "RoutingTrace",
    "capture_routing",
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
