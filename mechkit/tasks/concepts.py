"""Binary concept labels for probes: entity category, sentence polarity, statement truth.

Each concept comes at three difficulties, chosen so that a probe's accuracy says *where* a model
keeps the concept:

============  ===============================  ===============================  ==================================
concept       easy                             medium                           hard
============  ===============================  ===============================  ==================================
category      person vs country                city vs country                  creature vs thing (animal / object)
polarity      one sentiment word               ... possibly negated ("not")     two clauses, the last one counts
truth         claim vs a fact stated in        claim vs a memorised fact        claim vs a two-hop composition of
              context (copying suffices)                                        memorised facts
============  ===============================  ===============================  ==================================

Labels are balanced (half each, one extra 1 if ``n`` is odd). ``answer`` holds the class word
(" person", " positive", " true", ...). ``corrupt_prompt`` is the minimal same-length twin with
the other label (another entity, the opposite adjective, the other claim): contrast pairs for
concept vectors.
"""

from __future__ import annotations

import random

from .base import TaskItem, TaskSet, balanced_labels, check_choice, check_n, make_rng, other
from .two_hop import CHAINS
from .world import ENTITIES, KIND_WORDS, RELATIONS, World, build_world, render, template_ids, values_of

CONCEPTS = ("category", "polarity", "truth")
DIFFICULTIES = ("easy", "medium", "hard")
CATEGORY_PAIRS = {"easy": ("person", "country"), "medium": ("city", "country"), "hard": ("animal", "object")}
CATEGORY_FRAMES = ("I heard about {s}.", "We talked about {s}.", "Nobody forgets {s}.")
POSITIVE = ("good", "great", "tasty", "fresh")
NEGATIVE = ("bad", "awful", "bland", "stale")
POLARITY_FRAMES = {
    "easy": "The {food} in {city} is {neg}{adj}.",
    "medium": "The {food} in {city} is {neg}{adj}.",
    "hard": "The {food} in {city} looked {adj0} but tasted {neg}{adj}.",
}
CLASS_WORDS = {"polarity": ("negative", "positive"), "truth": ("false", "true")}
FACT_RELATIONS = tuple(r for r in RELATIONS if r != "kind")
VOCAB_TEXT = (*CATEGORY_FRAMES, *POSITIVE, *NEGATIVE, *POLARITY_FRAMES.values(), "not",
              *(w for pair in CLASS_WORDS.values() for w in pair))


def concepts(n: int, seed: int = 0, *, concept: str = "truth", difficulty: str = "medium",
             world: World | None = None) -> TaskSet:
    """``n`` labelled sentences for ``concept`` at ``difficulty``; labels are balanced."""
    check_n(n)
    check_choice("concept", concept, CONCEPTS)
    check_choice("difficulty", difficulty, DIFFICULTIES)
    if n < 2:
        raise ValueError("a balanced binary label set needs n >= 2")
    world = world or build_world(0)
    rng = make_rng(f"concepts.{concept}.{difficulty}", seed)
    make = {"category": _category, "polarity": _polarity, "truth": _truth}[concept]
    items = []
    for label in balanced_labels(rng, n):
        item = make(rng, world, difficulty, label)
        items.append(TaskItem(item.prompt, item.answer, item.corrupt_prompt, item.corrupt_answer, label,
                              {"concept": concept, "difficulty": difficulty, **item.meta}))
    params = {"n": n, "seed": seed, "concept": concept, "difficulty": difficulty, "world_seed": world.seed}
    return TaskSet("concepts", tuple(items), params)


def _category(rng: random.Random, _world: World, difficulty: str, label: int) -> TaskItem:
    kinds = CATEGORY_PAIRS[difficulty]
    frame = rng.choice(CATEGORY_FRAMES)
    entity, twin = rng.choice(ENTITIES[kinds[label]]), rng.choice(ENTITIES[kinds[1 - label]])
    words = [" " + KIND_WORDS[k] for k in kinds]
    meta = {"entity": entity, "classes": list(kinds)}
    return TaskItem(frame.format(s=entity), words[label], frame.format(s=twin), words[1 - label], None, meta)


def _polarity(rng: random.Random, _world: World, difficulty: str, label: int) -> TaskItem:
    # label 1 = positive; with negation the adjective must carry the opposite sentiment.
    negated = difficulty != "easy" and rng.random() < 0.5
    pools = (NEGATIVE, POSITIVE)
    adj_polarity = label ^ int(negated)
    adj, twin_adj = rng.choice(pools[adj_polarity]), rng.choice(pools[1 - adj_polarity])
    slots = {"food": rng.choice(values_of("food")), "city": rng.choice(ENTITIES["city"]),
             "neg": "not " if negated else "", "adj0": rng.choice(POSITIVE + NEGATIVE)}
    frame = POLARITY_FRAMES[difficulty]
    words = [" " + w for w in CLASS_WORDS["polarity"]]
    meta = {"adjective": adj, "negated": negated}
    return TaskItem(frame.format(adj=adj, **slots), words[label], frame.format(adj=twin_adj, **slots),
                    words[1 - label], None, meta)


def _truth(rng: random.Random, world: World, difficulty: str, label: int) -> TaskItem:
    if difficulty == "hard":
        chain = rng.choice(list(CHAINS))
        r1, r2, question = CHAINS[chain]
        s = rng.choice(world.subjects(r1))
        true_obj = world.lookup(r2, world.lookup(r1, s))
        pattern = question.format(s=s) + " {x}."
        values, meta = values_of(RELATIONS[r2][1]), {"chain": chain, "subject": s}
    else:
        rel = rng.choice(FACT_RELATIONS)
        s = rng.choice(world.subjects(rel))
        values = values_of(RELATIONS[rel][1])
        # Easy: the reference fact is stated in context (and may contradict the world).
        true_obj = rng.choice(values) if difficulty == "easy" else world.lookup(rel, s)
        t = 0 if difficulty == "easy" else rng.choice(template_ids(rel, "train"))
        prefix = render(rel, 0, s, true_obj) + ". " if difficulty == "easy" else ""
        pattern = prefix + render(rel, t, s, "{x}") + "."
        meta = {"relation": rel, "subject": s, "template": t}
    false_obj = other(rng, values, true_obj)
    said, twin = (true_obj, false_obj) if label else (false_obj, true_obj)
    words = [" " + w for w in CLASS_WORDS["truth"]]
    meta.update({"claimed": said, "true_object": true_obj})
    return TaskItem(pattern.format(x=said), words[label], pattern.format(x=twin), words[1 - label], None,
                    meta)
