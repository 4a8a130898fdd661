"""A synthetic world of invented entities and their attributes, and the fact corpus written from it.

Entity names are invented ("Zorbia", "Klim") so a model can only know a fact by having learned it.
The name pools are fixed (they define the word-level vocabulary); the seed only decides who has
which attribute, so every seed gives a different world over the same vocabulary.

Each relation has several sentence templates; the last one is *held out*: it never appears in the
training corpus, so recall through it measures paraphrase generalisation, not string memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .base import check_choice, draw, make_rng

COUNTRIES = (
    "Zorbia", "Velmora", "Quandor", "Drelvia", "Ostrania", "Meridon",
    "Tavoria", "Kelmar", "Brisna", "Yulvonia", "Pandrel", "Sorvakia",
)
CITIES = (
    "Klim", "Vorn", "Tesk", "Brall", "Duvan", "Plest", "Gorm", "Hallix", "Jorv", "Lumst", "Mirk", "Nesh",
    "Obran", "Prax", "Quell", "Rusk", "Sarn", "Tolv", "Ulbrek", "Vesk", "Wexor", "Yalt", "Zeld", "Crast",
)
PEOPLE = (
    "Anko", "Belo", "Cirra", "Dax", "Elsin", "Fenna", "Garo", "Hessa", "Ilo", "Jaro", "Kessa", "Lomi",
    "Marn", "Nilo", "Orsa", "Pim", "Quen", "Rilka", "Sabo", "Tesh", "Ulla", "Varo", "Wenna", "Yoss",
)
ANIMALS = ("blorf", "snarp", "glimmet", "vorpel", "drox", "plib", "tarsk", "quonk", "zibble", "mordle")
OBJECTS = ("zint", "crell", "fobble", "grask", "hemmet", "jindle", "lurp", "nobbin", "skell", "twib")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
FOODS = ("bread", "rice", "soup", "cheese", "fish", "pasta", "salad", "honey")
MATERIALS = ("wood", "metal", "glass", "stone", "cloth")

# The word a "kind" fact uses for each entity type.
KIND_WORDS = {"country": "country", "city": "city", "person": "person", "animal": "creature",
              "object": "thing"}
ENTITIES = {"country": COUNTRIES, "city": CITIES, "person": PEOPLE, "animal": ANIMALS, "object": OBJECTS}
VALUES = {"color": COLORS, "food": FOODS, "material": MATERIALS, "kind": tuple(KIND_WORDS.values())}

# relation -> (subject type, object type)
RELATIONS = {
    "capital": ("country", "city"),
    "located": ("city", "country"),
    "flag": ("country", "color"),
    "dish": ("country", "food"),
    "home": ("person", "city"),
    "likes": ("person", "food"),
    "favorite": ("person", "color"),
    "pet": ("person", "animal"),
    "coat": ("animal", "color"),
    "eats": ("animal", "food"),
    "color": ("object", "color"),
    "material": ("object", "material"),
    "kind": ("any", "kind"),
}

# {s} subject, {o} object; {o} always ends the sentence so the object is the next-token answer.
# The LAST template of every relation is held out of the training corpus.
TEMPLATES = {
    "capital": ["The capital of {s} is {o}", "{s} has its capital in {o}",
                "The capital city of {s} is called {o}", "The government of {s} sits in {o}"],
    "located": ["{s} is a city in {o}", "The city of {s} lies in {o}",
                "{s} is located in the country of {o}", "You can find {s} in {o}"],
    "flag": ["The flag of {s} is {o}", "{s} has a flag that is {o}",
             "The color of the flag of {s} is {o}", "People in {s} wave a flag colored {o}"],
    "dish": ["The national food of {s} is {o}", "In {s} people mostly eat {o}",
             "The favorite dish in {s} is {o}", "A typical meal in {s} is {o}"],
    "home": ["{s} lives in {o}", "The home of {s} is in {o}", "{s} has a house in {o}",
             "{s} resides in the city of {o}"],
    "likes": ["{s} likes to eat {o}", "The favorite food of {s} is {o}", "{s} loves eating {o}",
              "For dinner {s} always wants {o}"],
    "favorite": ["The favorite color of {s} is {o}", "{s} likes the color {o}",
                 "{s} prefers the color {o}", "Most clothes of {s} are {o}"],
    "pet": ["{s} has a pet {o}", "The pet of {s} is a {o}", "{s} owns a {o}", "At home {s} keeps a {o}"],
    "coat": ["The {s} is {o}", "The fur of the {s} is {o}", "The color of a {s} is {o}",
             "Every {s} you see is {o}"],
    "eats": ["The {s} eats {o}", "A {s} likes to eat {o}", "The food of the {s} is {o}",
             "In the wild a {s} feeds on {o}"],
    "color": ["The color of the {s} is {o}", "A {s} is always {o}", "Every {s} is painted {o}",
              "You will find that a {s} is {o}"],
    "material": ["The {s} is made of {o}", "A {s} is built from {o}", "Every {s} consists of {o}",
                 "The material of a {s} is {o}"],
    "kind": ["{s} is a {o}", "We know {s} as a {o}", "The name {s} refers to a {o}",
             "Everyone calls {s} a {o}"],
}
N_HELDOUT_TEMPLATES = 1
SPLITS = ("train", "heldout", "all")

# Everything above whose words must be in the word-level vocabulary.
VOCAB_TEXT = (
    *COUNTRIES, *CITIES, *PEOPLE, *ANIMALS, *OBJECTS, *COLORS, *FOODS, *MATERIALS, *KIND_WORDS.values(),
    *(t for ts in TEMPLATES.values() for t in ts), ".",
)


def template_ids(relation: str, split: str) -> list[int]:
    """Indices of the templates of ``relation`` that belong to ``split``."""
    check_choice("split", split, SPLITS)
    n = len(TEMPLATES[relation])
    first_heldout = n - N_HELDOUT_TEMPLATES
    return {"train": list(range(first_heldout)), "heldout": list(range(first_heldout, n)),
            "all": list(range(n))}[split]


def render(relation: str, template_id: int, subject: str, obj: str | None = None) -> str:
    """The sentence for one fact; with ``obj=None`` the prompt that stops just before the object."""
    text = TEMPLATES[relation][template_id]
    if obj is None:
        return text[: text.index("{o}")].rstrip().format(s=subject)
    return text.format(s=subject, o=obj)


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str


@dataclass(frozen=True)
class World:
    """Who has which attribute. Build with :func:`build_world`; the default world is seed 0."""

    seed: int
    facts: tuple[Fact, ...]
    _index: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({(f.relation, f.subject): f.object for f in self.facts})

    def lookup(self, relation: str, subject: str) -> str:
        if (relation, subject) not in self._index:
            raise KeyError(f"no {relation!r} fact about {subject!r}")
        return self._index[relation, subject]

    def subjects(self, relation: str) -> list[str]:
        return [f.subject for f in self.facts if f.relation == relation]

    def relation_facts(self, relation: str) -> list[Fact]:
        check_choice("relation", relation, RELATIONS)
        return [f for f in self.facts if f.relation == relation]

    def kind_of(self, entity: str) -> str:
        for kind, names in ENTITIES.items():
            if entity in names:
                return kind
        raise KeyError(f"{entity!r} is not an entity of the world")


def values_of(type_name: str) -> tuple[str, ...]:
    """All names an object of ``type_name`` (entity type or value type) can take."""
    return ENTITIES.get(type_name) or VALUES[type_name]


@lru_cache(maxsize=64)
def build_world(seed: int = 0) -> World:
    """Assign attributes to the fixed entity pools. Same seed, same world."""
    rng = make_rng("world", seed)
    cities = draw(rng, CITIES, len(CITIES))
    facts: list[Fact] = []
    # Each country owns two cities; the first is its capital, so capitals and cities stay consistent.
    for i, country in enumerate(COUNTRIES):
        own = cities[2 * i : 2 * i + 2]
        facts.append(Fact("capital", country, own[0]))
        facts += [Fact("located", city, country) for city in own]
        facts.append(Fact("flag", country, rng.choice(COLORS)))
        facts.append(Fact("dish", country, rng.choice(FOODS)))
    for person in PEOPLE:
        facts += [Fact("home", person, rng.choice(CITIES)), Fact("likes", person, rng.choice(FOODS)),
                  Fact("favorite", person, rng.choice(COLORS)), Fact("pet", person, rng.choice(ANIMALS))]
    for animal in ANIMALS:
        facts += [Fact("coat", animal, rng.choice(COLORS)), Fact("eats", animal, rng.choice(FOODS))]
    for obj in OBJECTS:
        facts += [Fact("color", obj, rng.choice(COLORS)), Fact("material", obj, rng.choice(MATERIALS))]
    for kind, names in ENTITIES.items():
        facts += [Fact("kind", name, KIND_WORDS[kind]) for name in names]
    facts.sort(key=lambda f: (f.relation, f.subject))
    return World(seed, tuple(facts))


def corpus(world: World | None = None, split: str = "train", seed: int = 0,
           repeats: int = 1) -> list[str]:
    """Every fact written with every template of ``split``, ``repeats`` times, shuffled by ``seed``.

    ``split="train"`` is what a model should be trained on; held-out templates stay unseen.
    """
    world = world or build_world(0)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sentences = [
        render(f.relation, t, f.subject, f.object) + "."
        for f in world.facts
        for t in template_ids(f.relation, split)
    ]
    return draw(make_rng("corpus", seed), sentences, repeats * len(sentences))
