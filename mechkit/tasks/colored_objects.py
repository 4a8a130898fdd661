"""Colored-objects retrieval: "On the desk there is a red cup, a blue pen and a green key.
What color is the pen?" -> " blue".

The corrupt prompt asks about another object of the same list, so only the queried noun changes
and the answer becomes that object's color. Colors within one prompt are distinct, so every
question has exactly one right answer.

:func:`colored_objects` writes plain prompts in the word-level vocabulary; :func:`colored_objects_bigbench`
writes the "Q: ... A:" form of BIG-bench's ``reasoning_about_colored_objects`` for pretrained models,
with the task's answer choices in ``meta["choices"]`` and ``meta["target_scores"]``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import TaskItem, TaskSet, check_n, make_rng
from .world import COLORS

OBJECTS = ("cup", "pen", "key", "book", "ball", "hat", "box", "lamp", "sock", "plate")
SURFACES = ("desk", "table", "floor", "shelf", "bed")
TEMPLATES = (
    "On the {surface} there is {things}. What color is the {query}?",
    "There is {things} on the {surface}. What color is the {query}?",
    "I put {things} on the {surface}. Which color is the {query}?",
)

# BIG-bench reasoning_about_colored_objects: its 18 colors, household objects and surfaces.
BIGBENCH_COLORS = (
    "red", "orange", "yellow", "green", "blue", "brown", "magenta", "fuchsia", "mauve", "teal",
    "turquoise", "burgundy", "silver", "gold", "black", "grey", "purple", "pink",
)
BIGBENCH_OBJECTS = (
    "cup", "pen", "pencil", "puzzle", "booklet", "plate", "notebook", "envelope", "jug", "necklace",
    "sunglasses", "textbook", "phone", "charger", "key", "ball", "hat", "lamp", "book", "box",
    "mug", "bracelet", "keychain", "crayon", "scarf", "paperclip",
)
BIGBENCH_SURFACES = ("nightstand", "table", "desk", "floor")
BIGBENCH_TEMPLATE = "Q: On the {surface}, {seer} {things}. What color is the {query}?\nA:"
BIGBENCH_SEERS = ("you see", "I see", "there is")

VOCAB_TEXT = (*TEMPLATES, *OBJECTS, *SURFACES, *COLORS, "and", "a", "an")


def colored_objects(n: int, seed: int = 0, *, n_objects: int | tuple[int, int] = 3) -> TaskSet:
    """``n`` plain colored-objects prompts with ``n_objects`` objects each (an int or a (lo, hi) range)."""
    check_n(n)
    rng = make_rng("colored_objects", seed)
    items = []
    for _ in range(n):
        k = _count(rng, n_objects, len(OBJECTS), len(COLORS))
        things, colors = rng.sample(OBJECTS, k), rng.sample(COLORS, k)
        t = rng.randrange(len(TEMPLATES))
        fill = {"surface": rng.choice(SURFACES), "things": _listing(things, colors, oxford=False)}
        items.append(_item(rng, TEMPLATES[t].format, fill, things, colors, {"template": t}))
    return TaskSet("colored_objects", tuple(items), {"n": n, "seed": seed, "n_objects": n_objects})


def colored_objects_bigbench(n: int, seed: int = 0, *, n_objects: int | tuple[int, int] = (2, 6),
                             colors: Sequence[str] = BIGBENCH_COLORS,
                             objects: Sequence[str] = BIGBENCH_OBJECTS,
                             surfaces: Sequence[str] = BIGBENCH_SURFACES) -> TaskSet:
    """``n`` prompts in BIG-bench format; the choices are ``colors``."""
    check_n(n)
    rng = make_rng("colored_objects_bigbench", seed)
    colors, objects = list(dict.fromkeys(colors)), list(dict.fromkeys(objects))
    items = []
    for _ in range(n):
        k = _count(rng, n_objects, len(objects), len(colors))
        things, picked = rng.sample(objects, k), rng.sample(colors, k)
        fill = {"surface": rng.choice(surfaces), "seer": rng.choice(BIGBENCH_SEERS),
                "things": _listing(things, picked, oxford=True)}
        item = _item(rng, BIGBENCH_TEMPLATE.format, fill, things, picked, {"choices": colors})
        scores = {c: int(" " + c == item.answer) for c in colors}
        items.append(TaskItem(item.prompt, item.answer, item.corrupt_prompt, item.corrupt_answer, None,
                              {**item.meta, "target_scores": scores}))
    params = {"n": n, "seed": seed, "n_objects": n_objects}
    return TaskSet("colored_objects_bigbench", tuple(items), params)


def _item(rng: random.Random, fill, slots: dict, things: list[str], colors: list[str],
          extra: dict) -> TaskItem:
    q, q_bad = rng.sample(range(len(things)), 2)
    meta = {"objects": things, "colors": colors, "query": things[q], "corrupt_query": things[q_bad],
            "surface": slots["surface"], **extra}
    return TaskItem(fill(query=things[q], **slots), " " + colors[q],
                    fill(query=things[q_bad], **slots), " " + colors[q_bad], None, meta)


def _count(rng: random.Random, n_objects: int | tuple[int, int], n_things: int, n_colors: int) -> int:
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 2 <= lo <= hi <= min(n_things, n_colors):
        raise ValueError(f"n_objects must lie within 2..{min(n_things, n_colors)}, got {n_objects!r}")
    return rng.randint(lo, hi)


def _listing(things: list[str], colors: list[str], oxford: bool) -> str:
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {t}" for t, c in zip(things, colors)]
    if len(parts) == 2:
        return " and ".join(parts)
    last = ", and " if oxford else " and "
    return ", ".join(parts[:-1]) + last + parts[-1]
