"""Accuracy of the grokking models on their modular-arithmetic task, and the choice of the checkpoints
shipped along the training curve. Pure functions; nothing here changes global state."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from mechkit.tasks.modarith import ModArithData, ModArithTask


def answer_logits(model, tokens: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Logits at the last position (the answer), in chunks, without gradients. [N, vocab]"""
    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), chunk):
            out.append(model(tokens[i : i + chunk], logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


def metrics_from_logits(logits: torch.Tensor, data: ModArithData, ops: Sequence[str]) -> dict:
    """Accuracy and mean loss on the train and test examples (and per op, with several ops)."""
    loss = torch.nn.functional.cross_entropy(logits, data.labels, reduction="none")
    right = (logits.argmax(-1) == data.labels).float()
    res = {}
    for split, mask in (("train", data.train), ("test", ~data.train)):
        res[f"{split}_acc"] = right[mask].mean().item()
        res[f"{split}_loss"] = loss[mask].mean().item()
        if len(ops) > 1:
            for i, op in enumerate(ops):
                m = mask & (data.op == i)
                res[f"{split}_acc[{op}]"] = right[m].mean().item()
    return res


def evaluate_model(model, task: ModArithTask, data: ModArithData) -> dict:
    was_training = model.training
    model.eval()
    try:
        return metrics_from_logits(answer_logits(model, data.tokens), data, task.ops)
    finally:
        model.train(was_training)


def first_step(records: Sequence[dict], key: str, threshold: float) -> int | None:
    """Earliest recorded step whose ``key`` reaches ``threshold``."""
    return next((r["step"] for r in records if r[key] >= threshold), None)


def select_checkpoints(records: Sequence[dict], n: int, total_steps: int) -> list[int]:
    """Choose ``n`` steps to ship from the evaluated candidates: the first and last, the steps where
    train accuracy reaches 99% and test accuracy 95%, and the rest spread evenly along the arc length
    of the curve (step / total, best train acc so far, best test acc so far) — denser where the
    accuracies rise. Checkpoints caught inside a loss spike are only kept if they are milestones."""
    steps = [r["step"] for r in records]
    if len(steps) <= n:
        return steps
    must = {steps[0], steps[-1]}
    for key, thr in (("train_acc", 0.99), ("test_acc", 0.95)):
        s = first_step(records, key, thr)
        if s is not None:
            must.add(s)
    # running maxima: a short loss spike (Adam's "slingshot") must not attract checkpoints
    best_train = list(itertools.accumulate((r["train_acc"] for r in records), max))
    best_test = list(itertools.accumulate((r["test_acc"] for r in records), max))
    pts = [(r["step"] / max(total_steps, 1), a, b) for r, a, b in zip(records, best_train, best_test)]
    arc = [0.0]
    for u, v in itertools.pairwise(pts):
        arc.append(arc[-1] + math.dist(u, v))
    # a checkpoint caught inside a spike is not representative of its phase: skip it
    dipped = {
        i for i, r in enumerate(records) if r["train_acc"] < best_train[i] - 0.25 or r["test_acc"] < best_test[i] - 0.25
    }
    chosen = set(must)
    k = n - len(chosen)
    for j in range(1, k + 1):
        target = arc[-1] * j / (k + 1)
        free = [i for i in range(len(steps)) if steps[i] not in chosen and i not in dipped]
        if not free:
            break
        i = min(free, key=lambda i: (abs(arc[i] - target), i))
        chosen.add(steps[i])
    return sorted(chosen)
