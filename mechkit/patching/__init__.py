"""Patching: activation, path and attribution patching on clean/corrupt prompt pairs."""

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
from mechkit.patching.result import PatchingResult

__all__ = [
    "PatchingPairs",
    "PatchingResult",
    "accuracy",
    "answer_logprob",
    "answer_prob",
    "answer_token",
    "kl_to",
    "last_logits",
    "logit_diff",
    "make_pairs",
    "recovery",
]
