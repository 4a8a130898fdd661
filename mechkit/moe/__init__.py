"""MoE routing pathways (METHODS §6): routing capture for any supported MoE family, router weights,
pathway strings, distance, consistency (smoothness / complexity), entropy, memorization bookkeeping
and the memorization → generalization monitor over a checkpoint series."""

from mechkit.moe.capture import RoutingTrace, capture_routing, routing_sites, store_sample_routing
from mechkit.moe.config import PathwayConfig
from mechkit.moe.functional import (
    complexity,
    layer_cosines,
    layer_pathway_distances,
    mean_pathway_distance,
    pathway_distance,
    pathway_strings,
    pearson,
    routing_embeddings,
    routing_entropy,
    sample_routing,
    smoothness,
    spearman,
)
from mechkit.moe.memorization import auto_epsilon, generalized_at, memorized_since
from mechkit.moe.monitor import checkpoint_folders, pathway_monitor
from mechkit.moe.result import PathwayMonitorResult
from mechkit.moe.routers import router_weights
from mechkit.moe.samples import read_samples, split_samples

__all__ = [
    "PathwayConfig",
    "PathwayMonitorResult",
    "RoutingTrace",
    "auto_epsilon",
    "capture_routing",
    "checkpoint_folders",
    "complexity",
    "generalized_at",
    "layer_cosines",
    "layer_pathway_distances",
    "mean_pathway_distance",
    "memorized_since",
    "pathway_distance",
    "pathway_monitor",
    "pathway_strings",
    "pearson",
    "read_samples",
    "router_weights",
    "routing_embeddings",
    "routing_entropy",
    "routing_sites",
    "sample_routing",
    "smoothness",
    "spearman",
    "split_samples",
    "store_sample_routing",
]
