"""Fact recall: "The capital of Zorbia is" -> " Klim", through training or held-out paraphrases.

The facts themselves are the world's (a model memorises all of them); what is split is the
*template*: ``split="heldout"`` asks through sentence forms absent from the training corpus.
The corrupt prompt asks the same template about another subject whose answer differs.
"""

from __future__ import annotations

from .base import TaskItem, TaskSet, check_choice, check_n, draw, make_rng, other
from .world import RELATIONS, SPLITS, World, build_world, render, template_ids


def facts(n: int, seed: int = 0, *, world: World | None = None, split: str = "train",
          relations: list[str] | None = None) -> TaskSet:
    """``n`` fact-recall prompts over ``relations`` (default: all) through templates of ``split``."""
    check_n(n)
    check_choice("split", split, SPLITS)
    world = world or build_world(0)
    relations = list(relations or RELATIONS)
    for rel in relations:
        check_choice("relation", rel, RELATIONS)
    rng = make_rng("facts", seed)
    pool = [(f, t) for rel in relations for f in world.relation_facts(rel) for t in template_ids(rel, split)]
    items = []
    for fact, t in draw(rng, pool, n):
        rivals = [g for g in world.relation_facts(fact.relation) if g.object != fact.object]
        rival = other(rng, rivals)
        heldout = t in template_ids(fact.relation, "heldout")
        items.append(TaskItem(
            prompt=render(fact.relation, t, fact.subject),
            answer=" " + fact.object,
            corrupt_prompt=render(fact.relation, t, rival.subject),
            corrupt_answer=" " + rival.object,
            meta={"relation": fact.relation, "subject": fact.subject, "object": fact.object,
                  "template": t, "split": "heldout" if heldout else "train",
                  "corrupt_subject": rival.subject},
        ))
    params = {"n": n, "seed": seed, "world_seed": world.seed, "split": split, "relations": relations}
    return TaskSet("facts", tuple(items), params)
