"""Accuracy of a wrapped causal LM on the real-model task sets in ``probes/*_real.jsonl``.

    >>> import mechkit
    >>> from mechkit.zoo.real_eval import evaluate_real_sets
    >>> evaluate_real_sets(mechkit.load("zoo:smollm2-135m"), "probes")   # doctest: +SKIP

Every score reads the next-token logits at the last prompt position (right padding, so each row's
own last real token). Per set:

- ``ioi_real``: ``accuracy`` = the indirect object's token is the top-1 next token;
  ``logit_diff`` = mean logit(IO) - logit(S); ``io_over_s`` = share of items with IO above S.
- ``colored_objects_real``: ``accuracy`` = the right color ranks first among the item's answer
  choices (BIG-bench scoring); ``top1`` = it is also the top-1 next token; ``picks_mentioned`` =
  the chosen color is one of the prompt's colors; ``mentioned_chance`` = accuracy of guessing
  among those.
- ``capitals_real``: ``accuracy`` = the capital's token is the top-1 next token.
- ``city_truth_real``: ``accuracy`` = of the two statements about a city in one template (true
  country, wrong country), the true one has the higher log-likelihood (chance 1/2);
  ``verbal_accuracy`` = asked as ``TRUTH_FORMAT``, " True" vs " False" has the right order.

Answers of the sets are single tokens for the SmolLM2 tokenizer; for other tokenizers the first
token of an answer stands for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechkit.tasks import TaskSet

SETS = ("ioi_real", "colored_objects_real", "capitals_real", "city_truth_real")
TRUTH_FORMAT = "Is the following statement true or false?\n{statement}\nAnswer:"
TRUTH_WORDS = (" False", " True")  # index = label

# Measured by ``evaluate_real_sets(mechkit.load("zoo:smollm2-135m"), "probes")`` (fp32, CPU) on the
# complete sets ("all") and on their first 40 items ("first40"); mirrored in assets/zoo/README.md.
RECORDED: dict[str, dict[str, dict[str, float]]] = {
    "all": {
        "ioi_real": {"n": 300, "accuracy": 0.9433, "logit_diff": 4.8673, "io_over_s": 0.98, "chance": 0.5},
        "colored_objects_real": {
            "n": 300, "accuracy": 0.23, "top1": 0.0, "chance": 0.0769, "picks_mentioned": 0.7367,
            "mentioned_chance": 0.2942},
        "capitals_real": {"n": 280, "accuracy": 0.5607, "chance": 0.025},
        "city_truth_real": {
            "n": 400, "accuracy": 0.965, "pairs": 200.0, "verbal_accuracy": 0.4925,
            "verbal_said_true": 0.0175, "chance": 0.5},
    },
    "first40": {
        "ioi_real": {"n": 40, "accuracy": 0.875, "logit_diff": 4.5135, "io_over_s": 0.95, "chance": 0.5},
        "colored_objects_real": {
            "n": 40, "accuracy": 0.25, "top1": 0.0, "chance": 0.0769, "picks_mentioned": 0.675,
            "mentioned_chance": 0.3029},
        "capitals_real": {"n": 40, "accuracy": 0.5, "chance": 0.0357},
        "city_truth_real": {
            "n": 40, "accuracy": 0.95, "pairs": 20.0, "verbal_accuracy": 0.5, "verbal_said_true": 0.05,
            "chance": 0.5},
    },
}


def first_token(tokenizer: Any, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def last_logits(model: Any, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Next-token logits after each prompt, [N, vocab] in fp32. Prompts are batched by length."""
    tok = model.tokenizer
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out = torch.empty(0)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = model.tokenize([prompts[i] for i in idx])
        with torch.no_grad():
            logits = model(batch)
        rows = logits[torch.arange(len(idx)), batch.last_positions].float()
        if out.numel() == 0:
            out = torch.empty(len(prompts), rows.shape[-1])
        out[torch.tensor(idx)] = rows
    return out


def ioi_scores(model: Any, ts: TaskSet, batch_size: int = 16) -> dict[str, float]:
    tok = model.tokenizer
    logits = last_logits(model, ts.prompts, batch_size)
    io = torch.tensor([first_token(tok, " " + it.meta["io"]) for it in ts])
    s = torch.tensor([first_token(tok, " " + it.meta["s"]) for it in ts])
    rows = torch.arange(len(ts))
    diff = logits[rows, io] - logits[rows, s]
    return {"accuracy": _mean(logits.argmax(-1) == io), "logit_diff": diff.mean().item(),
            "io_over_s": _mean(diff > 0), "chance": 0.5}


def colored_objects_scores(model: Any, ts: TaskSet, batch_size: int = 16) -> dict[str, float]:
    tok = model.tokenizer
    logits = last_logits(model, ts.prompts, batch_size)
    right, top1, mentioned, chance, guess = [], [], [], [], []
    for row, it in zip(logits, ts):
        choices = [first_token(tok, " " + c) for c in it.meta["choices"]]
        answer = first_token(tok, it.answer)
        best = choices[int(row[choices].argmax())]
        right.append(best == answer)
        top1.append(int(row.argmax()) == answer)
        mentioned.append(best in [first_token(tok, " " + c) for c in it.meta["colors"]])
        chance.append(1 / len(choices))
        guess.append(1 / len(it.meta["colors"]))
    return {"accuracy": _mean(right), "top1": _mean(top1), "chance": sum(chance) / len(chance),
            "picks_mentioned": _mean(mentioned), "mentioned_chance": sum(guess) / len(guess)}


def capitals_scores(model: Any, ts: TaskSet, batch_size: int = 16) -> dict[str, float]:
    tok = model.tokenizer
    logits = last_logits(model, ts.prompts, batch_size)
    want = torch.tensor([first_token(tok, it.answer) for it in ts])
    n_capitals = len({it.answer for it in ts})
    return {"accuracy": _mean(logits.argmax(-1) == want), "chance": 1 / n_capitals}


def sequence_logprobs(model: Any, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Total log-probability of each text's tokens after its first, [N]."""
    out = torch.empty(len(texts))
    for start in range(0, len(texts), batch_size):
        batch = model.tokenize(list(texts[start : start + batch_size]))
        with torch.no_grad():
            logp = torch.log_softmax(model(batch).float(), -1)
        ids, mask = batch.input_ids[:, 1:], batch.attention_mask[:, 1:].bool()
        token_logp = logp[:, :-1].gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        out[start : start + len(ids)] = (token_logp * mask).sum(-1)
    return out


def city_truth_scores(model: Any, ts: TaskSet, batch_size: int = 16) -> dict[str, float]:
    """``accuracy``: of the two statements about one city in one template (its true country and a
    wrong one), the true one has the higher log-likelihood. ``verbal_accuracy``: asked as
    ``TRUTH_FORMAT``, the logit of " True" vs " False" gives the right label."""
    tok = model.tokenizer
    pairs = _truth_pairs(ts)
    if not pairs:
        raise ValueError(f"{ts.name}: no (true, false) statement pairs to compare")
    logp = sequence_logprobs(model, [s for pair in pairs for s in pair], batch_size).view(-1, 2)
    prompts = [TRUTH_FORMAT.format(statement=it.prompt) for it in ts]
    logits = last_logits(model, prompts, batch_size)
    words = [first_token(tok, w) for w in TRUTH_WORDS]
    said_true = logits[:, words[1]] > logits[:, words[0]]
    labels = torch.tensor([it.label for it in ts]).bool()
    return {"accuracy": _mean(logp[:, 0] > logp[:, 1]), "pairs": float(len(pairs)),
            "verbal_accuracy": _mean(said_true == labels), "verbal_said_true": _mean(said_true),
            "chance": 0.5}


def _truth_pairs(ts: TaskSet) -> list[tuple[str, str]]:
    """(true statement, false statement) for each (city, template) present with both labels."""
    found: dict[tuple, dict[int, str]] = {}
    for it in ts:
        found.setdefault((it.meta["city"], it.meta["template"]), {})[int(it.label)] = it.prompt
    return [(d[1], d[0]) for d in found.values() if set(d) == {0, 1}]


SCORERS = {"ioi_real": ioi_scores, "colored_objects_real": colored_objects_scores,
           "capitals_real": capitals_scores, "city_truth_real": city_truth_scores}


def load_set(probes_dir: str | Path, name: str, limit: int | None = None) -> TaskSet:
    """A real set from ``probes_dir``; ``limit`` keeps its first items (the files are shuffled)."""
    ts = TaskSet.from_jsonl(Path(probes_dir) / f"{name}.jsonl", name)
    if limit is None:
        return ts
    items = list(ts.items)
    if name == "city_truth_real":  # keep whole (true, false) pairs, in order of first appearance
        first: dict[tuple, int] = {}
        for i, it in enumerate(items):
            first.setdefault((it.meta["city"], it.meta["template"]), i)
        items.sort(key=lambda it: first[it.meta["city"], it.meta["template"]])
    return TaskSet(name, tuple(items[:limit]), {**ts.params, "limit": limit})


def evaluate_real_sets(model: Any, probes_dir: str | Path = "probes", *, sets: Sequence[str] = SETS,
                       limit: int | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{set: {"n", "accuracy", "chance", ...}}`` for a wrapped model (``mechkit.load`` result)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model needs a tokenizer: load it with mechkit.load(...)")
    unknown = [s for s in sets if s not in SCORERS]
    if unknown:
        raise ValueError(f"unknown real sets {unknown}; available: {list(SCORERS)}")
    out = {}
    for name in sets:
        ts = load_set(probes_dir, name, limit)
        out[name] = {"n": len(ts), **SCORERS[name](model, ts, batch_size)}
    return out


def _mean(values: Any) -> float:
    t = torch.as_tensor(values, dtype=torch.float32)
    return t.mean().item()
