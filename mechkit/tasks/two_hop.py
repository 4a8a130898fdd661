"""Two-hop questions, answered from facts given in context or from memory.

A chain composes two relations: ``home`` then ``located`` asks "Dax lives in the country of" ->
the country of the city Dax lives in. The same question comes in two modes:

- ``"recall"``: the question alone; the model must compose two memorised facts;
- ``"context"``: both hops are stated first ("Dax lives in Klim. ... Klim is a city in Zorbia."),
  together with ``distractors`` other chains; all first hops come before all second hops, so the
  bridge entity must be followed. With ``counterfactual=True`` the stated facts are random rather
  than the world's, so only reading the context gives the answer.

Corrupt prompts: in context mode the bridge entity is replaced (in both of its sentences) by one
leading elsewhere; in recall mode the question is asked about another subject.
"""

from __future__ import annotations

import random

from .base import TaskItem, TaskSet, check_choice, check_n, draw, make_rng, other
from .world import RELATIONS, World, build_world, render, values_of

# chain name -> (first relation, second relation, question with {s})
CHAINS = {
    "home_country": ("home", "located", "{s} lives in the country of"),
    "pet_color": ("pet", "coat", "The pet of {s} has the color"),
    "pet_food": ("pet", "eats", "The pet of {s} eats"),
    "city_flag": ("located", "flag", "The flag over {s} is"),
}
MODES = ("context", "recall")
VOCAB_TEXT = tuple(q for _, _, q in CHAINS.values())


def two_hop(n: int, seed: int = 0, *, mode: str = "context", chains: list[str] | None = None,
            distractors: int = 1, counterfactual: bool = False, world: World | None = None) -> TaskSet:
    """``n`` two-hop questions over ``chains`` (default: all) in ``mode``."""
    check_n(n)
    check_choice("mode", mode, MODES)
    chains = list(chains or CHAINS)
    for name in chains:
        check_choice("chain", name, CHAINS)
    if mode == "recall" and counterfactual:
        raise ValueError("counterfactual facts only exist in context mode")
    if not 0 <= distractors <= 3:
        raise ValueError(f"distractors must lie within 0..3, got {distractors}")
    world = world or build_world(0)
    rng = make_rng("two_hop", seed)
    pool = [(c, s) for c in chains for s in world.subjects(CHAINS[c][0])]
    make = _recall_item if mode == "recall" else _context_item
    items = [make(rng, world, c, s, distractors, counterfactual) for c, s in draw(rng, pool, n)]
    params = {"n": n, "seed": seed, "mode": mode, "chains": chains, "distractors": distractors,
              "counterfactual": counterfactual, "world_seed": world.seed}
    return TaskSet("two_hop", tuple(items), params)


def _composed(world: World, chain: str, subject: str) -> tuple[str, str]:
    r1, r2, _ = CHAINS[chain]
    bridge = world.lookup(r1, subject)
    return bridge, world.lookup(r2, bridge)


def _recall_item(rng: random.Random, world: World, chain: str, s: str, _d: int, _cf: bool) -> TaskItem:
    question = CHAINS[chain][2]
    bridge, answer = _composed(world, chain, s)
    rivals = [x for x in world.subjects(CHAINS[chain][0]) if _composed(world, chain, x)[1] != answer]
    s_bad = other(rng, rivals)
    meta = {"chain": chain, "mode": "recall", "subject": s, "bridge": bridge, "object": answer,
            "corrupt_subject": s_bad}
    return TaskItem(question.format(s=s), " " + answer, question.format(s=s_bad),
                    " " + _composed(world, chain, s_bad)[1], None, meta)


def _context_item(rng: random.Random, world: World, chain: str, s: str, n_distract: int,
                  counterfactual: bool) -> TaskItem:
    r1, r2, question = CHAINS[chain]
    bridge_pool, object_pool = values_of(RELATIONS[r1][1]), values_of(RELATIONS[r2][1])

    def link(bridge: str, *avoid: str) -> str:
        # The second hop: the world's fact, or a random value for counterfactual contexts.
        return other(rng, object_pool, *avoid) if counterfactual else world.lookup(r2, bridge)

    if counterfactual:
        b = rng.choice(bridge_pool)
        hops = [(s, b, link(b))]
    else:
        hops = [(s, *_composed(world, chain, s))]
    subjects = [x for x in world.subjects(r1) if x != s]
    rng.shuffle(subjects)
    for x in subjects:
        if len(hops) > n_distract:
            break
        b = rng.choice(bridge_pool) if counterfactual else world.lookup(r1, x)
        o = link(b, hops[0][2])
        if b not in [h[1] for h in hops] and o != hops[0][2]:
            hops.append((x, b, o))
    # Corrupt: a fresh bridge, absent from the context, whose second hop gives another answer.
    used = [h[1] for h in hops]
    fresh = [b for b in bridge_pool if b not in used and (counterfactual or link(b) != hops[0][2])]
    b_bad = other(rng, fresh)
    o_bad = link(b_bad, hops[0][2])
    first, second = list(range(len(hops))), list(range(len(hops)))
    rng.shuffle(first)
    rng.shuffle(second)

    def text(target: tuple[str, str, str]) -> str:
        rows = [target, *hops[1:]]
        facts = [render(r1, 0, rows[i][0], rows[i][1]) + "." for i in first]
        facts += [render(r2, 0, rows[i][1], rows[i][2]) + "." for i in second]
        return " ".join([*facts, question.format(s=s)])

    meta = {"chain": chain, "mode": "context", "subject": s, "bridge": hops[0][1], "object": hops[0][2],
            "counterfactual": counterfactual, "corrupt_bridge": b_bad,
            "distractors": [list(h) for h in hops[1:]]}
    return TaskItem(text(hops[0]), " " + hops[0][2], text((s, b_bad, o_bad)), " " + o_bad, None, meta)
