"""Patching metrics as pure functions of logits, read at each row's last real token.

Every metric returns one value per row (``[batch]``), so a batched sweep that stacks many patched
variants in one forward scores each row on its own; averaging over prompts happens afterwards.
``targets`` is the :class:`~mechkit.patching.pairs.PatchingPairs` of those rows (``pairs.select``
repeats pairs to match stacked variants). :func:`recovery` normalises a patched score between the
clean and the corrupt run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["METRICS", "accuracy", "answer_logprob", "answer_prob", "kl_to", "last_logits", "logit_diff",
           "recovery", "resolve_metric"]

Metric = Callable[[Tensor, Any], Tensor]


def last_logits(logits: Tensor, targets: Any) -> Tensor:
    """``[batch, vocab]``: the logits at each row's last real token."""
    last = targets.last
    if logits.shape[0] != last.shape[0]:
        raise MechkitError(f"metric got {logits.shape[0]} rows of logits for {last.shape[0]} prompts")
    return logits[torch.arange(logits.shape[0]), last.to(logits.device)].float()


def logit_diff(logits: Tensor, targets: Any) -> Tensor:
    """Logit of the answer minus the logit of the counterfactual (``wrong``) token."""
    if targets.wrong is None:
        raise MechkitError("logit_diff needs a counterfactual token per prompt: pass wrong= to make_pairs "
                           "(or use metric='logprob' / 'prob')")
    final = last_logits(logits, targets)
    rows = torch.arange(final.shape[0])
    return final[rows, targets.answers] - final[rows, targets.wrong]


def answer_logprob(logits: Tensor, targets: Any) -> Tensor:
    final = last_logits(logits, targets).log_softmax(-1)
    return final[torch.arange(final.shape[0]), targets.answers]


def answer_prob(logits: Tensor, targets: Any) -> Tensor:
    return answer_logprob(logits, targets).exp()


def accuracy(logits: Tensor, targets: Any) -> Tensor:
    """1.0 where the answer is the top next token, else 0.0."""
    return (last_logits(logits, targets).argmax(-1) == targets.answers).float()


def kl_to(reference_logits: Tensor) -> Metric:
    """A metric: KL(reference ‖ run) at the last real token; ``reference_logits`` is ``[batch, vocab]``
    over the original pairs (e.g. the clean run's :func:`last_logits`), matched to rows through ``targets.rows``."""
    reference = reference_logits.float().log_softmax(-1)

    def kl(logits: Tensor, targets: Any) -> Tensor:
        ref = reference[targets.rows]
        run = last_logits(logits, targets).log_softmax(-1)
        return (ref.exp() * (ref - run)).sum(-1)

    return kl


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "logprob": answer_logprob, "prob": answer_prob,
                              "accuracy": accuracy}


def logits_needed(model: Any, metric: Metric) -> str | None:
    """``"last"`` when ``metric`` is a built-in one (it reads each row's last real token only), so a
    run may compute logits there alone (``run_with_interventions(logits_at=...)``); None otherwise."""
    return "last" if metric in METRICS.values() and not model.info.encoder else None


def resolve_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise MechkitError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a function "
                           "metric(logits, targets) -> [batch]")
    return METRICS[metric]


def recovery(patched: Tensor | float, clean: Tensor | float, corrupt: Tensor | float, *,
             direction: str = "denoise", eps: float = 1e-6) -> Tensor:
    """Normalised effect of a patch, from prompt-mean metric values.

    ``denoise`` (clean activations patched into the corrupt run): (m_patched − m_corrupt) /
    (m_clean − m_corrupt). ``noise`` (corrupt activations patched into the clean run):
    (m_patched − m_clean) / (m_corrupt − m_clean). Either is 0 when the patch changes nothing and 1
    when it moves the metric all the way to the other run.
    """
    patched, clean, corrupt = (torch.as_tensor(v, dtype=torch.float64) for v in (patched, clean, corrupt))
    if not (torch.isfinite(patched).all() and torch.isfinite(clean).all() and torch.isfinite(corrupt).all()):
        raise MechkitError("the metric returned NaN or infinite values; check the answer tokens and the metric")
    if direction not in ("denoise", "noise"):
        raise MechkitError(f"direction={direction!r}: use 'denoise' or 'noise'")
    gap = clean - corrupt
    if gap.abs().max() < eps:
        raise MechkitError(f"the clean and corrupt runs give the same metric ({float(clean.mean()):.4g}): there is "
                           "no effect to explain — check that the corruption changes the answer")
    return (patched - corrupt) / gap if direction == "denoise" else (patched - clean) / -gap
