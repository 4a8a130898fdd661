"""Fine-tune ``facts-lm`` (or any checkpoint of its architecture) with extra in-context sources and
watch whether in-context two-hop composition appears; a diagnostic for issue 6 item 8, not a recipe.

Extra sources, all counterfactual (random values, so memory cannot answer), loss on the answer only:

- ``lookup``: k facts of one relation, then one fact's own prompt again ("Dax lives in Klim. Bob
  lives in Mor. Bob lives in" -> Mor), which an induction head answers;
- ``hops``: a two-hop context (1-3 distractor chains) asking one of its single hops ("S lives in" ->
  bridge, or "B is a city in" -> object);
- ``two_hop``: the two-hop question itself (1-3 distractor chains);
- ``second_only``: the two-hop question where distractor chains state only their second hop, so the
  bridge is unique and only the second look-up has to use a fetched token;
- ``first_question`` / ``second_question`` / ``question_hops`` (both): one hop of a two-hop context
  asked through a paraphrase shaped like the two-hop question ("S lives in the city of" -> bridge,
  "The city of B lies in" -> object), so no repeated prefix gives it away;
- ``gap`` (``home_gap``: home facts only; ``near_gap``: key and value adjacent): facts stated with
  0..all of the words between key and value kept ("Anko Prax." / "Marn in Crast." / "Rilka lives in
  Gorm."), asked the same way.

``--grow 2,4`` inserts identity blocks (a 6-layer model with the same function) before training;
``--bridge-layer L`` adds intermediate supervision: 32 two-hop rows per step whose residual stream after
block L, at the question's last position, must decode (final norm + unembedding) to the bridge. What
reached 0.994 held out (``bench/RESULTS.md``)::

    ... --steps 3000 --mix 0.3 --gap 32 --question-hops 32 --two-hop 64 --lr 2e-3 --save A
    ... --init A --steps 1500 --mix 0.3 --gap 16 --question-hops 16 --two-hop 48 --bridge-layer 2 --lr 1e-3

The base mix of the recipe (``Stream``) trains next to them, scaled by ``--mix``. Every 100 steps it
prints accuracy on fresh items of each source and on the held-out two-hop set of the card::

    OMP_NUM_THREADS=1 .venv/bin/python bench/facts_lm_two_hop_finetune.py --steps 1500 --hops 32 --two-hop 24
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM

from mechkit import tasks
from mechkit.tasks.two_hop import CHAINS
from mechkit.tasks.world import RELATIONS, TEMPLATES, build_world, render, values_of
from mechkit.zoo.recipes import facts_lm
from mechkit.zoo.recipes.facts_eval import accuracy, eval_sets, is_eval_prompt, measure

LOOKUP_RELATIONS = ("home", "located", "pet", "coat", "eats", "flag")


def item(prompt: str, answer: str) -> tasks.TaskItem:
    return tasks.TaskItem(prompt, " " + answer, None, None, None, {})


def lookup_items(rng: random.Random, n: int, k_range: tuple[int, int] = (2, 4)) -> list[tasks.TaskItem]:
    world, out = build_world(0), []
    while len(out) < n:
        rel = rng.choice(LOOKUP_RELATIONS)
        k = rng.randint(*k_range)
        subjects = rng.sample(list(dict.fromkeys(world.subjects(rel))), k)
        objects = rng.sample(values_of(RELATIONS[rel][1]), k)
        q = rng.randrange(k)
        facts = " ".join(render(rel, 0, s, o) + "." for s, o in zip(subjects, objects))
        prompt = facts + " " + render(rel, 0, subjects[q])
        if not is_eval_prompt(prompt):
            out.append(item(prompt, objects[q]))
    return out


def two_hop_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    out: list[tasks.TaskItem] = []
    while len(out) < n:
        batch = tasks.generate("two_hop", 8, rng.randrange(10**8), distractors=rng.randint(1, 3), counterfactual=True)
        out += [it for it in batch if not is_eval_prompt(it.prompt)]
    return out[:n]


def hop_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    out = []
    for it in two_hop_items(rng, n):
        r1, r2, _ = CHAINS[it.meta["chain"]]
        facts = it.prompt[: it.prompt.rindex(".") + 1]
        if rng.random() < 0.5:
            out.append(item(facts + " " + render(r1, 0, it.meta["subject"]), it.meta["bridge"]))
        else:
            out.append(item(facts + " " + render(r2, 0, it.meta["bridge"]), it.meta["object"]))
    return out


def second_only_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    out = []
    for it in two_hop_items(rng, n):
        r1, r2, question = CHAINS[it.meta["chain"]]
        s, b, o = it.meta["subject"], it.meta["bridge"], it.meta["object"]
        seconds = [(b, o)] + [(d[1], d[2]) for d in it.meta["distractors"]]
        rng.shuffle(seconds)
        facts = [render(r1, 0, s, b) + "."] + [render(r2, 0, x, y) + "." for x, y in seconds]
        out.append(item(" ".join([*facts, question.format(s=s)]), o))
    return out


# Single hops asked at the final position of a question shaped like the two-hop one (a paraphrase, so
# not answerable by copying after a repeated prefix): first hop -> bridge, second hop -> object.
FIRST_HOP_QUESTIONS = {"home_country": "{s} lives in the city of", "pet_color": "The pet of {s} is a",
                       "pet_food": "The pet of {s} is a", "city_flag": "The country over {s} is"}
SECOND_HOP_QUESTIONS = {"home_country": "The city of {s} lies in", "pet_color": "The color of a {s} is",
                        "pet_food": "The food of the {s} is", "city_flag": "{s} has a flag that is"}


def _question_hop_items(rng: random.Random, n: int, first: float) -> list[tasks.TaskItem]:
    out = []
    for it in two_hop_items(rng, n):
        facts, chain = it.prompt[: it.prompt.rindex(".") + 1], it.meta["chain"]
        if rng.random() < first:
            out.append(item(facts + " " + FIRST_HOP_QUESTIONS[chain].format(s=it.meta["subject"]), it.meta["bridge"]))
        else:
            out.append(item(facts + " " + SECOND_HOP_QUESTIONS[chain].format(s=it.meta["bridge"]), it.meta["object"]))
    return out


def question_hop_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    return _question_hop_items(rng, n, 0.5)


def first_question_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    return _question_hop_items(rng, n, 1.0)


def second_question_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    return _question_hop_items(rng, n, 0.0)


# The question asked of a stated fact of each relation: shaped like the two-hop questions, not like the fact.
GAP_QUESTIONS = {"home": ("{s} lives in the city of",), "pet": ("The pet of {s} is a",),
                 "located": ("The country over {s} is", "The city of {s} lies in"), "coat": ("The color of a {s} is",),
                 "eats": ("The food of the {s} is",), "flag": ("{s} has a flag that is",)}


def _split_template(rel: str) -> tuple[str, list[str]]:
    """(words before the key, words between key and value) of the relation's corpus sentence."""
    before, between = TEMPLATES[rel][0].split("{s}")
    return before, between.replace("{o}", "").split()


def shortened(rel: str, s: str, o: str, keep: int) -> str:
    """The relation's corpus sentence with only the last ``keep`` words kept between key and value."""
    before, middle = _split_template(rel)
    return f"{before}{s} {' '.join([*middle[len(middle) - keep:], o])}."


def gap_items(rng: random.Random, n: int, *, near_only: bool = False,
              relations: tuple[str, ...] = tuple(GAP_QUESTIONS)) -> list[tasks.TaskItem]:
    """Counterfactual facts with 0..all of the words between key and value kept (all = the corpus
    sentence), asked through a question shaped like the two-hop ones: mixing the distances teaches a
    look-up that the corpus distance alone (3-4 tokens) does not."""
    world, out = build_world(0), []
    while len(out) < n:
        rel, k = rng.choice(relations), rng.randint(2, 4)
        subjects = rng.sample(list(dict.fromkeys(world.subjects(rel))), k)
        objects = rng.sample(values_of(RELATIONS[rel][1]), k)
        width = len(_split_template(rel)[1])
        facts = " ".join(shortened(rel, x, y, 0 if near_only else rng.randint(0, width))
                         for x, y in zip(subjects, objects))
        q = rng.randrange(k)
        prompt = facts + " " + rng.choice(GAP_QUESTIONS[rel]).format(s=subjects[q])
        if not is_eval_prompt(prompt):
            out.append(item(prompt, objects[q]))
    return out


def home_gap_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    return gap_items(rng, n, relations=("home",))


def near_gap_items(rng: random.Random, n: int) -> list[tasks.TaskItem]:
    return gap_items(rng, n, near_only=True, relations=("home",))


SOURCES = {"gap": gap_items, "home_gap": home_gap_items, "near_gap": near_gap_items, "lookup": lookup_items,
           "question_hops": question_hop_items, "first_question": first_question_items,
           "second_question": second_question_items, "hops": hop_items, "two_hop": two_hop_items,
           "second_only": second_only_items}


def grow(model, at: list[int]):
    """Insert identity blocks (copies of the block before, output projections zeroed, so the function
    is unchanged) at the positions ``at`` of the original model's layer list."""
    import copy

    layers = list(model.model.layers)
    for i in sorted(at, reverse=True):
        block = copy.deepcopy(layers[i - 1])
        for proj in (block.self_attn.o_proj, block.mlp.down_proj):
            torch.nn.init.zeros_(proj.weight)
        layers.insert(i, block)
    for i, block in enumerate(layers):
        block.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[0]] * len(layers)
    return model


def bridge_loss(model, tok, stream, items: list[tasks.TaskItem], layer: int, limit: int) -> torch.Tensor:
    """Intermediate supervision: the residual stream after block ``layer`` at the two-hop question's
    last position, read through the final norm and the unembedding, should name the bridge."""
    encoded = [stream._task_row(it, True) for it in items]
    ids, _ = facts_lm._pad([r[:-1] for r, _ in encoded], [y[:-1] for _, y in encoded], limit)
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
    last = (ids != 0).sum(-1) - 1
    h = out.hidden_states[layer][torch.arange(len(items)), last]
    logits = model.lm_head(model.model.norm(h)).float()
    bridges = torch.tensor([tok(" " + it.meta["bridge"], add_special_tokens=False).input_ids[0] for it in items])
    return torch.nn.functional.cross_entropy(logits, bridges)


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="assets/zoo/facts-lm")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mix", type=float, default=1.0, help="scale of the recipe's own rows per step")
    for name in SOURCES:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=0, help=f"{name} rows per step")
    ap.add_argument("--save", default="")
    ap.add_argument("--bridge-layer", type=int, default=0, help="supervise the bridge after this block")
    ap.add_argument("--bridge-weight", type=float, default=1.0)
    ap.add_argument("--grow", default="", help="insert identity blocks before these layers, e.g. 2,4")
    args = ap.parse_args()
    rows = {name: getattr(args, name) for name in SOURCES}

    model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).train()
    if args.grow:
        model = grow(model, [int(i) for i in args.grow.split(",")])
    tok = tasks.load_tokenizer("assets/zoo/facts-lm")
    base = facts_lm.spec()
    sp = dataclasses.replace(base, rows=tuple((s, max(1, int(n * args.mix))) for s, n in base.rows))
    stream = facts_lm.Stream(sp)
    probes = {name: tasks.TaskSet(name, tuple(make(random.Random(77), 300)), {}) for name, make in SOURCES.items()}
    heldout = eval_sets(500)["two_hop"][0]

    def to_rows(items: list[tasks.TaskItem]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [stream._task_row(it, True) for it in items]
        return facts_lm._pad([r for r, _ in encoded], [y for _, y in encoded], sp.n_positions)

    def report(step: int, t0: float) -> None:
        model.eval()
        with torch.no_grad():
            acc = {name: accuracy(model, tok, ts) for name, ts in probes.items()}
            acc["heldout_two_hop"] = accuracy(model, tok, heldout)
            if step % 500 == 0:
                acc.update(measure(model, tok, 500, limit=200))
        model.train()
        print(step, round(time.time() - t0), json.dumps({k: round(v, 3) for k, v in acc.items()}), flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=sp.weight_decay, betas=sp.betas)
    rng, t0 = random.Random(0), time.time()
    report(0, t0)
    for step in range(1, args.steps + 1):
        batch = stream.batch(10**6 + step)  # steps the recipe never draws
        batch.update({name: to_rows(SOURCES[name](rng, n)) for name, n in rows.items() if n})
        losses = [facts_lm.row_loss(model(input_ids=ids, attention_mask=(ids != 0).long()).logits.float(), lab,
                                    sp.context_weight) for ids, lab in batch.values()]
        if args.bridge_layer:
            losses.append(args.bridge_weight * bridge_loss(model, tok, stream, two_hop_items(rng, 32),
                                                           args.bridge_layer, sp.n_positions))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50)
        opt.zero_grad(set_to_none=True)
        (sum(losses) / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sp.grad_clip)
        opt.step()
        if step % 100 == 0:
            report(step, t0)
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
