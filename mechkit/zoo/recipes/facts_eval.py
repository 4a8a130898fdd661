"""Held-out evaluation of ``facts-lm``: which prompts never train, the evaluation sets, chance levels
and greedy next-token accuracy.

Held out three ways: prompts whose CRC-32 falls in the evaluation bucket never train
(:func:`is_eval_prompt`), the in-context sets are drawn with seeds no training step uses, and facts
are asked through the paraphrase templates the corpus never contains. Accuracy = the greedy next
token at the last prompt position equals the answer's token.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import torch

from mechkit import tasks
from mechkit.tasks.two_hop import CHAINS
from mechkit.tasks.world import RELATIONS, build_world, values_of

EVAL_SEED = 10**9  # training steps use seeds below this
EVAL_BUCKETS = 10  # 1 in 10 prompts (by CRC-32) is reserved for evaluation


def is_eval_prompt(prompt: str) -> bool:
    """True for the prompts reserved for evaluation (never trained on)."""
    return zlib.crc32(prompt.encode("utf-8")) % EVAL_BUCKETS == 0


@lru_cache(maxsize=4)
def eval_sets(n: int = 500) -> dict[str, tuple[tasks.TaskSet, float, str]]:
    """name -> (held-out items, chance accuracy, description). Deterministic; never trained on."""
    world = build_world(0)
    heldout = tasks.generate("facts", len(world.facts), EVAL_SEED, split="heldout")
    recall = tasks.generate("facts", 3 * len(world.facts), EVAL_SEED, split="train")
    sets = {
        "facts_heldout": (heldout, "every fact through its held-out paraphrase template"),
        "facts_recall": (recall, "every fact through its training templates (memorised recall)"),
        "ioi": (_fresh("ioi", n), "IOI with the world's names; chance = 1/2 names in context"),
        "colored_objects": (_fresh("colored_objects", n, n_objects=3), "3 objects; chance = 1/3"),
        "two_hop": (_fresh("two_hop", n, distractors=2, counterfactual=True),
                    "counterfactual facts in context, 2 distractor chains; chance = 1/3 in context"),
        "analogies": (_merge(_fresh("analogies", n // 2, fmt="words"),
                             _fresh("analogies", n - n // 2, fmt="symbols")),
                      "A is to B as C is to / A : B :: C :, prompts never trained; chance = 1/|answer type|"),
        "two_hop_recall": (tasks.generate("two_hop", 96, EVAL_SEED, mode="recall"),
                           "two hops from memory, never trained (latent composition); 1/|answer type|"),
    }
    return {k: (ts, chance(k, ts), d) for k, (ts, d) in sets.items()}


def _fresh(name: str, n: int, **kw) -> tasks.TaskSet:
    items: list[tasks.TaskItem] = []
    seed = EVAL_SEED
    while len(items) < n:
        items += [it for it in tasks.generate(name, 20 * n, seed, **kw) if is_eval_prompt(it.prompt)]
        seed += 1
    return tasks.TaskSet(name, tuple(items[:n]), {"n": n, "seed": EVAL_SEED, **kw})


def _merge(a: tasks.TaskSet, b: tasks.TaskSet) -> tasks.TaskSet:
    return tasks.TaskSet(a.name, a.items + b.items, {"parts": [a.params, b.params]})


def chance(name: str, ts: tasks.TaskSet) -> float:
    """Accuracy of guessing uniformly among the plausible answers of each item."""
    if name == "ioi":
        return 0.5
    if name == "colored_objects":
        return sum(1 / len(it.meta["objects"]) for it in ts) / len(ts)
    if name == "two_hop":
        return sum(1 / (1 + len(it.meta["distractors"])) for it in ts) / len(ts)
    rel = {"two_hop_recall": lambda it: CHAINS[it.meta["chain"]][1]}.get(name, lambda it: it.meta["relation"])
    return sum(1 / len(values_of(RELATIONS[rel(it)][1])) for it in ts) / len(ts)


def accuracy(model, tokenizer, items: tasks.TaskSet, chunk: int = 256) -> float:
    """Share of items whose greedy next token after the prompt is the answer's (first) token."""
    right = 0
    with torch.no_grad():
        for i in range(0, len(items), chunk):
            part = items.items[i : i + chunk]
            enc = tokenizer([it.prompt for it in part], return_tensors="pt", padding=True)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            last = enc.attention_mask.sum(-1) - 1
            pred = logits[torch.arange(len(part)), last].argmax(-1)
            want = [tokenizer(it.answer, add_special_tokens=False).input_ids[0] for it in part]
            right += int((pred == torch.tensor(want)).sum())
    return right / len(items)


def measure(model, tokenizer, n: int, limit: int | None = None) -> dict[str, float]:
    """Accuracy on every evaluation set (its first ``limit`` items, if given), in eval mode."""
    was = model.training
    model.eval()
    try:
        return {k: accuracy(model, tokenizer, _head(ts, limit)) for k, (ts, _, _) in eval_sets(n).items()}
    finally:
        model.train(was)


def _head(ts: tasks.TaskSet, limit: int | None) -> tasks.TaskSet:
    return ts if limit is None or len(ts) <= limit else tasks.TaskSet(ts.name, ts.items[:limit], ts.params)
