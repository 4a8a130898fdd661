"""Common record types and helpers shared by every task generator.

Conventions every generator follows:

- ``prompt + answer`` is the full text, so answers start with a space (`` " Klim"``); this keeps one
  rule for word-level and BPE tokenizers alike.
- ``corrupt_prompt`` differs from ``prompt`` only in the words that change the answer and has the
  same number of tokens; ``corrupt_answer`` is its answer (None when it has no single answer).
- ``label`` is an int class for probing tasks (None elsewhere); ``answer`` then holds the class word.
- ``meta`` holds only JSON types (lists, not tuples) so that items survive a JSONL round trip.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ITEM_KEYS = ("prompt", "answer", "corrupt_prompt", "corrupt_answer", "label", "meta")


@dataclass(frozen=True)
class TaskItem:
    """One prompt with its answer, an optional same-length corrupted twin and an optional label."""

    prompt: str
    answer: str
    corrupt_prompt: str | None = None
    corrupt_answer: str | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> TaskItem:
        unknown = set(row) - set(_ITEM_KEYS)
        if unknown or "prompt" not in row or "answer" not in row:
            raise ValueError(f"not a task item (keys {sorted(row)}); expected {list(_ITEM_KEYS)}")
        return cls(**{k: row[k] for k in _ITEM_KEYS if k in row})


@dataclass(frozen=True)
class TaskSet:
    """An ordered, immutable collection of task items with the name and parameters that made it."""

    name: str
    items: tuple[TaskItem, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TaskItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> TaskItem:
        return self.items[index]

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def answers(self) -> list[str]:
        return [it.answer for it in self.items]

    @property
    def labels(self) -> list[int | None]:
        return [it.label for it in self.items]

    def filter(self, **meta: Any) -> TaskSet:
        """Items whose ``meta`` matches every given key, e.g. ``ts.filter(split="train")``."""
        kept = [it for it in self.items if all(it.meta.get(k) == v for k, v in meta.items())]
        return TaskSet(self.name, tuple(kept), {**self.params, "filter": meta})

    def to_jsonl(self, path: str | Path) -> Path:
        """One JSON object per line (items only), readable by pandas / datasets as well."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(it.to_dict(), ensure_ascii=False, sort_keys=True) for it in self.items]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None) -> TaskSet:
        path = Path(path)
        items = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(TaskItem.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
        return cls(name or path.stem, tuple(items), {"source": str(path)})


# ---------------------------------------------------------------- validation and sampling helpers


def check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return n


def check_fraction(name: str, value: float, allow_zero: bool = False) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def make_rng(task: str, seed: int) -> random.Random:
    """A private generator per (task, seed): no global state, and tasks sharing a seed stay independent.

    String seeds hash through SHA-512 in ``random``, so results do not depend on PYTHONHASHSEED.
    The namespace string predates the package's move to ``mechkit.tasks``; it is kept so that every
    seed still draws the data it always drew (the shipped evaluation sets and ``probes/`` files).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return random.Random(f"mechkit.zoo.tasks.{task}:{seed}")


def draw(rng: random.Random, pool: Sequence[Any], n: int) -> list[Any]:
    """``n`` elements of ``pool``: no repeats until the pool is used up, then a fresh permutation."""
    if not pool:
        raise ValueError("cannot draw from an empty pool")
    out: list[Any] = []
    while len(out) < n:
        perm = list(pool)
        rng.shuffle(perm)
        out.extend(perm[: n - len(out)])
    return out


def balanced_labels(rng: random.Random, n: int) -> list[int]:
    """``n`` binary labels, half of each class (one extra 1 if ``n`` is odd), in shuffled order."""
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    rng.shuffle(labels)
    return labels


def other(rng: random.Random, pool: Sequence[Any], *exclude: Any) -> Any:
    """A random element of ``pool`` that is none of ``exclude``."""
    left = [x for x in pool if x not in exclude]
    if not left:
        raise ValueError(f"no element of {list(pool)} left after excluding {list(exclude)}")
    return rng.choice(left)


# ---------------------------------------------------------------- token-length checks


def count_tokens(tokenizer: Any, text: str) -> int:
    """Token count without special tokens, for a ``transformers`` or a raw ``tokenizers`` tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return len(tokenizer.encode(text, add_special_tokens=False).ids)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_equal_length(items: Iterable[TaskItem], tokenizer: Any) -> None:
    """Raise ``ValueError`` listing every item whose corrupt prompt (or answer) differs in token count.

    Patching compares clean and corrupt runs position by position, so a length mismatch silently
    misaligns every site; failing here is much cheaper than debugging that later.
    """
    bad = []
    for i, it in enumerate(items):
        pairs = [("prompt", it.prompt, it.corrupt_prompt), ("answer", it.answer, it.corrupt_answer)]
        for what, clean, corrupt in pairs:
            if corrupt is None:
                continue
            n_clean, n_corrupt = count_tokens(tokenizer, clean), count_tokens(tokenizer, corrupt)
            if n_clean != n_corrupt:
                bad.append(f"  item {i} {what}: {n_clean} vs {n_corrupt} tokens: {clean!r} / {corrupt!r}")
    if bad:
        shown = "\n".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} clean/corrupt pair(s) differ in token length:\n{shown}")
