"""The input of every patching method: clean and corrupt prompts, paired, with answer tokens.

``PatchingPairs`` holds both batches (right-padded) and per prompt the answer token and the
counterfactual ("wrong") token. Pair ``i`` must tokenize to the same number of real tokens in its
clean and corrupt forms, so that a position counted among real tokens names the same slot in both
(pairs may differ in length from each other: padding is never patched). Answers must be single
tokens. Every violation is a :class:`MechkitError` that says which pair and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.models.inputs import Batch
from mechkit.tasks import TaskSet

__all__ = ["PatchingPairs", "answer_token", "make_pairs"]


@dataclass(frozen=True, eq=False)
class PatchingPairs:
    """``n`` clean/corrupt prompt pairs. ``answers`` / ``wrong``: ``[n]`` token ids (``wrong`` may be
    None when no metric needs it); ``last``: ``[n]`` index of each pair's last real token."""

    clean: Batch
    corrupt: Batch
    answers: Tensor
    wrong: Tensor | None
    clean_prompts: tuple[str, ...]
    corrupt_prompts: tuple[str, ...]
    origin: Tensor | None = None
    """``[n]``: the index of each row in the pairs it was selected from (None: ``arange(n)``)."""

    @property
    def rows(self) -> Tensor:
        return torch.arange(len(self)) if self.origin is None else self.origin

    def __len__(self) -> int:
        return self.answers.shape[0]

    @property
    def last(self) -> Tensor:
        return self.clean.last_positions

    @property
    def lengths(self) -> Tensor:
        """Real tokens per pair."""
        return self.clean.attention_mask.long().sum(-1)

    def select(self, rows: Sequence[int] | Tensor) -> PatchingPairs:
        """The pairs at ``rows`` (repeats allowed: batched sweeps repeat each pair once per variant)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return PatchingPairs(
            clean=_take(self.clean, index), corrupt=_take(self.corrupt, index), answers=self.answers[index],
            wrong=None if self.wrong is None else self.wrong[index],
            clean_prompts=tuple(self.clean_prompts[i] for i in index.tolist()),
            corrupt_prompts=tuple(self.corrupt_prompts[i] for i in index.tolist()), origin=self.rows[index],
        )


def _take(batch: Batch, index: Tensor) -> Batch:
    mask = batch.attention_mask[index]
    width = max(int(mask.sum(-1).max()), 1) if index.numel() else 0
    return Batch(batch.input_ids[index][:, :width], mask[:, :width])


def answer_token(model: Any, text: str) -> int:
    """The single token id of ``text`` (no special tokens); an error when it is not one token."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise MechkitError("the model has no tokenizer: pass answer token ids instead of strings")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise MechkitError(f"answer {text!r} is {len(ids)} tokens {pieces}, not one; patching metrics compare "
                           "single next-token logits — choose single-token answers (often with a leading space)")
    return int(ids[0])


def make_pairs(model: Any, clean: TaskSet | Sequence[str], corrupt: Sequence[str] | None = None,
               answers: Sequence[str | int] | None = None, wrong: Sequence[str | int] | None = None) -> PatchingPairs:
    """Pair ``clean`` with ``corrupt`` prompts and their answers.

    ``clean`` may be a :class:`TaskSet`: its items' ``corrupt_prompt`` and ``answer`` are used, and
    ``wrong`` defaults to each item's ``corrupt_answer`` (or, for IOI items, the subject name).
    Answers are strings (one token each) or token ids.
    """
    if isinstance(clean, TaskSet):
        corrupt = corrupt if corrupt is not None else [_field(it, "corrupt_prompt", i) for i, it in enumerate(clean)]
        answers = answers if answers is not None else [it.answer for it in clean]
        wrong = wrong if wrong is not None else _default_wrong(clean)
        clean = clean.prompts
    clean, corrupt = list(clean), list(corrupt) if corrupt is not None else None
    if corrupt is None or answers is None:
        raise MechkitError("patching needs corrupt prompts and answers: pass corrupt= and answers= (or a TaskSet)")
    if not clean:
        raise MechkitError("no prompts to patch")
    if not len(clean) == len(corrupt) == len(answers) or (wrong is not None and len(wrong) != len(clean)):
        raise MechkitError(f"{len(clean)} clean prompts, {len(corrupt)} corrupt prompts, {len(answers)} answers"
                           + ("" if wrong is None else f", {len(wrong)} wrong answers") + ": give one of each per pair")
    clean_batch, corrupt_batch = model.tokenize(clean), model.tokenize(corrupt)
    _check_lengths(clean_batch, corrupt_batch, clean, corrupt)
    return PatchingPairs(clean_batch, corrupt_batch, _ids(model, answers),
                         None if wrong is None else _ids(model, wrong), tuple(clean), tuple(corrupt))


def _field(item: Any, name: str, i: int) -> str:
    value = getattr(item, name)
    if value is None:
        raise MechkitError(f"task item {i} has no {name}; pass corrupt= explicitly or use a task with corruptions")
    return value


def _default_wrong(tasks: TaskSet) -> list[str] | None:
    wrong = []
    for item in tasks:
        if item.corrupt_answer is not None and item.corrupt_answer != item.answer:
            wrong.append(item.corrupt_answer)
        elif "s" in item.meta and "io" in item.meta:  # IOI: the subject is the counterfactual name
            wrong.append(" " + item.meta["s"])
        else:
            return None
    return wrong


def _ids(model: Any, values: Sequence[str | int]) -> Tensor:
    return torch.tensor([answer_token(model, v) if isinstance(v, str) else int(v) for v in values], dtype=torch.long)


def _check_lengths(clean: Batch, corrupt: Batch, clean_text: list[str], corrupt_text: list[str]) -> None:
    a, b = clean.attention_mask.sum(-1), corrupt.attention_mask.sum(-1)
    bad = (a != b).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise MechkitError(
            f"{len(bad)} clean/corrupt pairs tokenize to different lengths (first: pair {i}, {int(a[i])} vs "
            f"{int(b[i])} tokens: {clean_text[i]!r} / {corrupt_text[i]!r}); positions would not line up — use "
            "corruptions that keep the token count (e.g. swap single-token names)")
