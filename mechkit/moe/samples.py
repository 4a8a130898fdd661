"""Prompt/answer samples for the pathway monitor: read, tokenized and checked once.

A sample is a prompt and the answer the model should continue it with; the answer is appended to
the prompt verbatim (begin it with a space for word-level and BPE tokenizers, as in ``" Paris"``).
Sources: a JSONL file of ``{"prompt", "answer"}`` rows, a :class:`~mechkit.tasks.TaskSet`, a list
of such dicts or ``(prompt, answer)`` pairs, or — for the zoo's modular-arithmetic models — a model
folder with ``card.json`` and ``split.safetensors`` (:func:`split_samples`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechkit.errors import MechkitError
from mechkit.tasks import TaskSet
from mechkit.tasks.modarith import ModArithTask, make_data, prompts

__all__ = ["Encoded", "encode", "read_samples", "split_samples"]

SPLIT_FILE = "split.safetensors"


def read_samples(source: Any) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs from any of the sources of the module doc."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise MechkitError(f"{path} is a folder; give a JSONL file, or use split_samples(folder) for a zoo model")
        try:
            source = TaskSet.from_jsonl(path)
        except (OSError, ValueError) as exc:
            raise MechkitError(f"cannot read samples from {path}: {exc}; give JSONL rows with 'prompt' and "
                               "'answer'") from exc
    if isinstance(source, TaskSet):
        return list(zip(source.prompts, source.answers))
    pairs = [(row["prompt"], row["answer"]) if isinstance(row, dict) else tuple(row) for row in source]
    if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise MechkitError("samples must be (prompt, answer) pairs of strings or dicts with 'prompt' and 'answer'")
    return pairs


def split_samples(folder: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The training and test samples of a zoo modular-arithmetic model folder (its card's task and stored
    split; a label-shuffled control's training answers are the shuffled ones it was trained on)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card, split = folder / "card.json", folder / SPLIT_FILE
    if not card.is_file() or not split.is_file():
        raise MechkitError(f"{folder} has no card.json and {SPLIT_FILE}; give --train/--test JSONL files instead")
    task = ModArithTask.from_dict(json.loads(card.read_text())["task"])
    data = make_data(task, load_file(split)["train"].bool())
    rows = list(zip(prompts(task, data), (f" {int(a)}" for a in data.labels)))
    train = data.train.tolist()
    return [r for r, t in zip(rows, train) if t], [r for r, t in zip(rows, train) if not t]


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + answer per sample and where the answer starts."""

    ids: list[list[int]]
    n_prompt: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def encode(model: Any, samples: Sequence[tuple[str, str]], what: str = "samples") -> Encoded:
    """Tokenize samples with ``model``'s tokenizer; refuses samples whose prompt or answer has no tokens and
    answers that do not extend their prompt's tokens."""
    if not samples:
        raise MechkitError(f"no {what} given")
    for i, (prompt, answer) in enumerate(samples):
        if not prompt.strip() or not answer.strip():
            raise MechkitError(f"{what} {i} has an empty {'prompt' if not prompt.strip() else 'answer'}: a sample "
                               "with no tokens has no loss and no pathway; drop it")
    prompt_ids = _rows(model, [p for p, _ in samples])
    full_ids = _rows(model, [p + a for p, a in samples])
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        if not p or len(f) <= len(p) or f[:len(p)] != p:
            raise MechkitError(f"{what} {i} ({samples[i][0]!r} → {samples[i][1]!r}): the answer's tokens do not "
                               "extend the prompt's; begin the answer with a space")
    return Encoded(full_ids, [len(p) for p in prompt_ids])


def _rows(model: Any, texts: list[str]) -> list[list[int]]:
    batch = model.tokenize(texts)
    return [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
