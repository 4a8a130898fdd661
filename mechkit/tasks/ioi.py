"""Indirect-object identification: "When Anko and Belo went to the market, Belo gave a cup to" -> " Anko".

Names: IO (indirect object, the answer) and S (subject, mentioned twice). ``order`` says which of
the two comes first in the opening clause: "ABBA" (IO first) or "BABA" (S first); both are balanced.

Corruptions (same token count, since every name is one token):

- ``"swap"``: the second mention of S becomes IO, so the answer flips to S;
- ``"abc"``: the second mention of S becomes a third name C, removing the duplicate that the
  IOI circuit keys on; no single answer (``corrupt_answer`` is None), compare IO and S logits.

:func:`ioi` uses the world's invented names; :func:`ioi_wang` uses the templates of Wang et al.
(2022) with real first names, for pretrained models.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import TaskItem, TaskSet, balanced_labels, check_choice, check_n, draw, make_rng
from .world import PEOPLE

CORRUPTIONS = ("swap", "abc")

# {X} {Y}: opening clause in ``order``; {S}: second mention of the subject; prompt ends before IO.
TEMPLATES = (
    "When {X} and {Y} went to the {place}, {S} gave a {obj} to",
    "After {X} and {Y} arrived at the {place}, {S} handed a {obj} to",
    "{X} and {Y} were at the {place}. {S} gave the {obj} to",
    "While {X} and {Y} were working at the {place}, {S} passed a {obj} to",
    "Then {X} and {Y} walked to the {place}, and {S} brought a {obj} to",
)
PLACES = ("market", "store", "park", "school", "river", "station", "garden", "library")
THINGS = ("cup", "book", "ball", "drink", "letter", "gift", "coin", "map")

# The sentence forms of Wang et al. (2022), "Interpretability in the Wild", in the same placeholders.
WANG_TEMPLATES = (
    "Then, {X} and {Y} went to the {place}. {S} gave a {obj} to",
    "Then, {X} and {Y} had a lot of fun at the {place}. {S} gave a {obj} to",
    "Then, {X} and {Y} were working at the {place}. {S} decided to give a {obj} to",
    "Then, {X} and {Y} were thinking about going to the {place}. {S} wanted to give a {obj} to",
    "Then, {X} and {Y} had a long argument, and afterwards {S} said to",
    "After {X} and {Y} went to the {place}, {S} gave a {obj} to",
    "When {X} and {Y} got a {obj} at the {place}, {S} decided to give it to",
    "When {X} and {Y} got a {obj} at the {place}, {S} decided to give the {obj} to",
    "While {X} and {Y} were working at the {place}, {S} gave a {obj} to",
    "While {X} and {Y} were commuting to the {place}, {S} gave a {obj} to",
    "After the lunch, {X} and {Y} went to the {place}. {S} gave a {obj} to",
    "Afterwards, {X} and {Y} went to the {place}. {S} gave a {obj} to",
    "Then, {X} and {Y} had a long argument. Afterwards {S} said to",
    "The {place} {X} and {Y} went to had a {obj}. {S} gave it to",
    "Friends {X} and {Y} found a {obj} at the {place}. {S} gave it to",
)
WANG_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
WANG_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
# Common English first names, each a single token (with its leading space) for GPT-2/LLaMA-style BPE.
WANG_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate", "Rose", "Alex",
    "Anna", "Sarah", "Mike", "Lisa", "Jane", "Mark", "David", "Laura", "Emma", "Eric", "Adam", "Ben",
    "Chris", "Jack", "Sam", "Tim", "Joe", "Bob", "Alice", "Kevin", "Steve", "Ryan", "Brian", "Jason",
    "Andrew", "Thomas", "Richard", "Robert", "William", "George", "Peter", "Harry", "Daniel", "Matt",
    "Nick", "Susan", "Karen", "Nancy", "Helen", "Carol", "Ruth", "Anne", "Lucy", "Grace", "Claire",
    "Emily", "Rachel", "Henry", "Charles", "Edward", "Frank", "Scott", "Sean", "Ian", "Luke", "Max",
    "Leo", "Oliver", "Jacob", "Noah", "Carl", "Simon", "Hugo", "Tony", "Julia", "Maria", "Eva", "Nina",
)

VOCAB_TEXT = (*TEMPLATES, *PLACES, *THINGS)


def ioi(n: int, seed: int = 0, *, corrupt: str = "swap", names: Sequence[str] = PEOPLE) -> TaskSet:
    """``n`` IOI prompts over the world's invented names, for the word-level zoo models."""
    return _generate("ioi", n, seed, corrupt, TEMPLATES, names, PLACES, THINGS)


def ioi_wang(n: int, seed: int = 0, *, corrupt: str = "abc", names: Sequence[str] = WANG_NAMES,
             places: Sequence[str] = WANG_PLACES, objects: Sequence[str] = WANG_OBJECTS) -> TaskSet:
    """``n`` IOI prompts in the templates of Wang et al., for pretrained models."""
    return _generate("ioi_wang", n, seed, corrupt, WANG_TEMPLATES, names, places, objects)


def _generate(task: str, n: int, seed: int, corrupt: str, templates: Sequence[str],
              names: Sequence[str], places: Sequence[str], objects: Sequence[str]) -> TaskSet:
    check_n(n)
    check_choice("corrupt", corrupt, CORRUPTIONS)
    if len(set(names)) < 3:
        raise ValueError(f"IOI needs at least 3 distinct names, got {list(names)}")
    rng = make_rng(task, seed)
    orders = balanced_labels(rng, n)  # 1 = ABBA (IO first), 0 = BABA
    items = []
    for t, abba in zip(draw(rng, range(len(templates)), n), orders):
        io, s, c = rng.sample(list(dict.fromkeys(names)), 3)
        slots = {"place": rng.choice(places), "obj": rng.choice(objects)}
        x, y = (io, s) if abba else (s, io)
        fill = templates[t].format
        clean = fill(X=x, Y=y, S=s, **slots)
        if corrupt == "swap":
            bad, bad_answer = fill(X=x, Y=y, S=io, **slots), " " + s
        else:
            bad, bad_answer = fill(X=x, Y=y, S=c, **slots), None
        meta = {"template": t, "order": "ABBA" if abba else "BABA", "io": io, "s": s, "corrupt": corrupt,
                **slots}
        if corrupt == "abc":
            meta["c"] = c
        items.append(TaskItem(clean, " " + io, bad, bad_answer, None, meta))
    return TaskSet(task, tuple(items), {"n": n, "seed": seed, "corrupt": corrupt})
