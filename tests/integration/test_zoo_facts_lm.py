"""facts-lm: the shipped model re-measured through ``mechkit.load`` against its card, the separation
of training and evaluation data, a CI-sized smoke run of the recipe and bit-identical resumption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import mechkit
from mechkit import tasks
from mechkit.zoo import registry
from mechkit.zoo.recipes import facts_lm

TOL = 0.01  # eager (mechkit.load) vs default attention may flip a near-tie or two
# Solved tasks; paraphrase transfer and latent two-hop recall are partly learned (above chance);
# two-hop in context is NOT learned by this model (it picks an in-context candidate without
# following the chain, see assets/zoo/README.md): it is only checked against the card.
SOLVED = ("facts_recall", "ioi", "analogies", "colored_objects")
PARTIAL = ("facts_heldout", "two_hop_recall")


@pytest.fixture(scope="module")
def shipped() -> tuple[Path, dict]:
    folder = registry.resolve("facts-lm")
    return folder, json.loads((folder / "card.json").read_text())


def _accuracy(model, items: tasks.TaskSet) -> float:
    """Greedy next token at each prompt's last position == the answer token, via the wrapper."""
    right = 0
    for i in range(0, len(items), 256):
        part = items.items[i : i + 256]
        batch = model.tokenize([it.prompt for it in part])
        logits = model(batch)
        pred = logits[torch.arange(len(part)), batch.last_positions].argmax(-1)
        want = [model.tokenizer(it.answer, add_special_tokens=False).input_ids for it in part]
        assert all(len(w) == 1 for w in want)
        right += sum(int(p) == w[0] for p, w in zip(pred, want))
    return right / len(items)


def test_folder_and_card(shipped) -> None:
    folder, card = shipped
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "card.json"):
        assert (folder / f).is_file(), f
    assert not (folder / ".train_state").exists()
    assert card["name"] == "facts-lm" and card["recipe"] == registry.get("facts-lm").recipe
    assert card["smoke"] is False and card["architecture"] == "LlamaForCausalLM"
    for key in ("seed", "hyperparameters", "training_steps", "wall_time_s", "mechkit_version", "chance"):
        assert key in card
    assert set(card["metrics"]) == set(card["chance"]) == set(card["eval"]["sizes"])
    assert (folder / "model.safetensors").stat().st_size <= 5e6
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (4, 128, 4)


def test_shipped_metrics_match_card_and_beat_chance(shipped) -> None:
    _, card = shipped
    model = mechkit.load("zoo:facts-lm")
    assert model.info.n_layers == 4 and model.tokenizer is not None
    sets = facts_lm.eval_sets(card["eval"]["n"])
    for name, (items, chance, _) in sets.items():
        assert len(items) == card["eval"]["sizes"][name]
        assert chance == pytest.approx(card["chance"][name], abs=1e-4)
        acc = _accuracy(model, items)
        assert acc == pytest.approx(card["metrics"][name], abs=TOL), name
        if name in SOLVED:
            assert acc >= 0.9 and acc >= chance + 0.4, (name, acc, chance)
        if name in PARTIAL:
            assert acc >= 1.5 * chance, (name, acc, chance)


def _top1_words(model, items: tasks.TaskSet) -> list[str]:
    batch = model.tokenize(items.prompts)
    pred = model(batch)[torch.arange(len(items)), batch.last_positions].argmax(-1)
    return [model.tokenizer.decode(int(i)).strip() for i in pred]


def test_two_hop_picks_a_candidate_from_the_context(shipped) -> None:
    """What the model does learn on two-hop in context: its answer is the second hop of one of the
    chains the prompt mentions."""
    _, card = shipped
    model = mechkit.load("zoo:facts-lm")
    sets = facts_lm.eval_sets(card["eval"]["n"])
    hops = sets["two_hop"][0]
    picks = _top1_words(model, hops)
    cands = [[it.meta["object"], *(d[2] for d in it.meta["distractors"])] for it in hops]
    assert sum(p in c for p, c in zip(picks, cands)) >= 0.9 * len(hops)


def test_recipe_evaluate_agrees_with_card(shipped) -> None:
    _, card = shipped
    got = registry.evaluate("facts-lm")
    assert got.keys() == card["metrics"].keys()
    for name, value in got.items():
        assert value == pytest.approx(card["metrics"][name], abs=TOL), name


def test_evaluation_prompts_never_train() -> None:
    sp = facts_lm.spec()
    sets = facts_lm.eval_sets(sp.eval_n)
    heldout = set(sets["facts_heldout"][0].prompts)
    corpus = tasks.corpus(split="train")
    assert not any(s.startswith(p + " ") for s in corpus for p in heldout)
    stream = facts_lm.Stream(sp)
    seen: set[str] = set()
    for step in (1, 2, 3, 4, 5, 6, 7, 8, 1001, 2999):
        for source, _ in sp.rows:
            if source not in ("corpus", "induction"):
                seen |= {it.prompt for it in facts_lm._generate(source, 64, sp.seed * 10**7 + step, step)}
        assert set(stream.batch(step)) == set(sp.sources_at(step))
    assert sp.sources_at(1) == ("induction",) and set(sp.sources_at(sp.steps)) == {s for s, _ in sp.rows}
    assert len(seen) > 1000 and not any(facts_lm.is_eval_prompt(p) for p in seen)
    for name in ("ioi", "colored_objects", "two_hop", "analogies"):
        prompts = set(sets[name][0].prompts)
        assert all(facts_lm.is_eval_prompt(p) for p in prompts) and not prompts & seen


# --------------------------------------------------------------------------- recipe


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smoke_run_and_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    card = facts_lm.train(straight, smoke=True, progress=False)
    assert card["smoke"] is True and card["sessions"] == 1 and card["training_steps"] == 24
    for f in ("config.json", "model.safetensors", "tokenizer.json", "card.json"):
        assert (straight / f).is_file()
    assert not (straight / ".train_state").exists()
    assert [r["step"] for r in card["curve"]] == [8, 16, 24]
    assert facts_lm.evaluate(straight) == pytest.approx(card["metrics"], abs=1e-4)
    loaded = mechkit.load(str(straight))
    assert loaded(loaded.tokenize(["The capital of Zorbia is"])).shape[-1] == card["model_config"]["vocab_size"]

    # interrupted after step 7 (state saved at step 5), then resumed
    resumed = tmp_path / "resumed"
    assert facts_lm.train(resumed, smoke=True, progress=False, stop_after=7) == {"interrupted": True, "step": 7}
    assert json.loads((resumed / ".train_state" / "state.json").read_text())["step"] == 5
    again = facts_lm.train(resumed, smoke=True, progress=False)
    assert again["sessions"] == 2
    assert _sha(resumed / "model.safetensors") == _sha(straight / "model.safetensors")
    assert again["metrics"] == card["metrics"] and again["curve"] == card["curve"]

    other = tmp_path / "other"
    facts_lm.train(other, smoke=True, progress=False, stop_after=6)
    with pytest.raises(ValueError, match="different settings"):
        facts_lm.train(other, smoke=True, steps=30, progress=False)


def test_repeated_sequence_rows_target_the_repeat_only() -> None:
    stream = facts_lm.Stream(facts_lm.spec())
    rows, labels = stream._repeat_rows(16, seed=3)
    for row, lab in zip(rows, labels):
        k = (len(row) - 1) // 2
        assert row[1 : k + 1] == row[k + 1 :] and len(set(row[1 : k + 1])) == k  # w1..wk w1..wk, distinct
        targets = [(i, t) for i, t in enumerate(lab) if t != facts_lm.IGNORE]
        assert [i for i, _ in targets] == list(range(k + 2, 2 * k + 1))  # the repeat, after its first word
        assert all(row[i] == t for i, t in targets)
