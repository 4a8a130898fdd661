"""Seeded synthetic tasks with known answers: the data behind the zoo models, the real-model probes
and the analyses that run on them (this package depends on nothing else in mechkit).

Every generator takes ``n`` and ``seed`` (same seed, same data) and returns a :class:`TaskSet` of
:class:`TaskItem` records. ``generate("ioi", n=100, seed=0, corrupt="abc")`` picks one by name.
:class:`ModArithTask` (:mod:`mechkit.tasks.modarith`) is the tensor-valued task of the grokking
models, in its own one-token-per-residue vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Generators are imported under private names: re-exporting ``ioi`` etc. here would shadow the
# submodules of the same name (``import mechkit.tasks.ioi`` would then yield a function).
from .analogies import analogies as _analogies
from .base import TaskItem, TaskSet, check_equal_length, count_tokens
from .colored_objects import colored_objects as _colored_objects
from .colored_objects import colored_objects_bigbench as _colored_objects_bigbench
from .concepts import concepts as _concepts
from .facts import facts as _facts
from .ioi import ioi as _ioi
from .ioi import ioi_wang as _ioi_wang
from .modadd import modadd as _modadd
from .modarith import ModArithTask
from .tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, vocabulary
from .two_hop import two_hop as _two_hop
from .world import World, build_world, corpus

TASKS: dict[str, Callable[..., TaskSet]] = {
    "facts": _facts,
    "ioi": _ioi,
    "colored_objects": _colored_objects,
    "two_hop": _two_hop,
    "concepts": _concepts,
    "analogies": _analogies,
    "modadd": _modadd,
    # Real-language variants for pretrained models (outside the word-level vocabulary).
    "ioi_wang": _ioi_wang,
    "colored_objects_bigbench": _colored_objects_bigbench,
}
# Tasks written entirely in the word-level vocabulary of ``build_tokenizer``.
WORD_LEVEL_TASKS = ("facts", "ioi", "colored_objects", "two_hop", "concepts", "analogies", "modadd")


def generate(name: str, n: int, seed: int = 0, **kw: Any) -> TaskSet:
    """``TASKS[name](n, seed, **kw)`` with a clear error for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](n, seed, **kw)


__all__ = [
    "TASKS",
    "WORD_LEVEL_TASKS",
    "ModArithTask",
    "TaskItem",
    "TaskSet",
    "World",
    "build_tokenizer",
    "build_world",
    "check_equal_length",
    "corpus",
    "count_tokens",
    "generate",
    "load_tokenizer",
    "save_tokenizer",
    "vocabulary",
]
