"""Analogies over the world's relations: "Zorbia is to Klim as Velmora is to" -> " Vorn".

Both pairs share one relation (here ``capital``); the second pair's object always differs from the
first's, so copying B never answers. The corrupt prompt swaps C for another subject whose object
differs, which is the contrast a binding/unbinding probe needs. ``meta`` carries the relation and
the four terms for hyperdimensional probes that bind role and filler vectors.
"""

from __future__ import annotations

from .base import TaskItem, TaskSet, check_choice, check_n, draw, make_rng, other
from .world import RELATIONS, World, build_world

FORMATS = {"words": "{a} is to {b} as {c} is to", "symbols": "{a} : {b} :: {c} :"}
VOCAB_TEXT = tuple(FORMATS.values())


def analogies(n: int, seed: int = 0, *, relations: list[str] | None = None, fmt: str = "words",
              world: World | None = None) -> TaskSet:
    """``n`` analogies A:B :: C:D over ``relations`` (default: all), written in ``fmt``."""
    check_n(n)
    check_choice("fmt", fmt, FORMATS)
    relations = list(relations or RELATIONS)
    for rel in relations:
        check_choice("relation", rel, RELATIONS)
    world = world or build_world(0)
    rng = make_rng("analogies", seed)
    template = FORMATS[fmt]
    items = []
    for rel in draw(rng, relations, n):
        facts = world.relation_facts(rel)
        first = rng.choice(facts)
        second = other(rng, [f for f in facts if f.object != first.object])
        # Prefer a corrupt answer that is neither B nor D; small worlds may only allow "not D".
        rivals = [f for f in facts if f.object not in (first.object, second.object)]
        rival = other(rng, rivals or [f for f in facts if f.object != second.object])
        slots = {"a": first.subject, "b": first.object}
        items.append(TaskItem(
            prompt=template.format(c=second.subject, **slots),
            answer=" " + second.object,
            corrupt_prompt=template.format(c=rival.subject, **slots),
            corrupt_answer=" " + rival.object,
            meta={"relation": rel, "a": first.subject, "b": first.object, "c": second.subject,
                  "d": second.object, "corrupt_c": rival.subject, "format": fmt},
        ))
    return TaskSet("analogies", tuple(items), {"n": n, "seed": seed, "fmt": fmt, "relations": relations,
                                               "world_seed": world.seed})
