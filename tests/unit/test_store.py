"""ActivationStore and collect: contents, shards within the RAM budget, integrity, resume repair, bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechkit
from mechkit.activations.collect import collect
from mechkit.activations.config import CollectConfig
from mechkit.activations.store import PROVENANCE_KEYS, ActivationStore
from mechkit.config import ConfigError
from mechkit.errors import MechkitError, StoreError, UnknownSiteError
from tests.conftest import VOCAB, tiny_hf_model

SITES = ["blocks.0.resid_post", "blocks.1.attn.z"]
BUDGET_MB = 0.02  # ≈ 20 kB: a few batches per shard, so every store here has several shards


def make_prompts(n: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model():
    return mechkit.load(tiny_hf_model("gpt2"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return collect(model, make_prompts(), SITES, tmp_path_factory.mktemp("ref") / "s", batch_size=4,
                   ram_budget_mb=BUDGET_MB, progress=False)


def run(model, out, **kwargs):
    kwargs = {"batch_size": 4, "ram_budget_mb": BUDGET_MB, "progress": False, **kwargs}
    return collect(model, kwargs.pop("prompts", make_prompts()), kwargs.pop("sites", SITES), out, **kwargs)


def expected_rows(model, prompts, site, batch_size=4):
    """Real-token activations computed directly, batch by batch, as collect batches them."""
    parts = []
    for i in range(0, len(prompts), batch_size):
        batch = model.to_tokens(prompts[i : i + batch_size])
        _, cache = model.run_with_cache(batch, site)
        act = cache[site]
        parts.append(act[batch.attention_mask.bool()].reshape(-1, act[0, 0].numel()))
    return torch.cat(parts)


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert len(a) == len(b) and a.sites == b.sites
    for site in a.sites:
        assert torch.equal(a[site].load(), b[site].load())
    for column in ("token_ids", "prompt_indices", "positions"):
        assert torch.equal(getattr(a, column).load(), getattr(b, column).load())


# -- contents -----------------------------------------------------------------------------------
def test_rows_are_the_real_tokens_of_every_prompt(model, reference):
    prompts = make_prompts()
    assert len(reference) == sum(len(p) for p in prompts)
    for site in SITES:
        assert torch.equal(reference[site].load(), expected_rows(model, prompts, site))
    assert reference.site_shape("blocks.1.attn.z") == (4, 8) and reference.d("blocks.1.attn.z") == 32
    assert reference.token_ids.load().tolist() == [t for p in prompts for t in p]
    assert reference.prompt_indices.load().tolist() == [i for i, p in enumerate(prompts) for _ in p]
    assert reference.positions.load().tolist() == [j for p in prompts for j in range(len(p))]


def test_manifest_describes_the_store_and_shards_respect_the_budget(model, reference):
    m = reference.manifest
    assert len(reference.shards) >= 3 and m["status"] == "complete" and reference.complete
    assert m["model_fingerprint"] == model.parameters_fingerprint() and m["backend"] == "torch_hooks"
    assert m["sites"] == SITES and m["positions"] == "all" and m["dtype"] == "float32"
    assert m["d"] == {"blocks.0.resid_post": 32, "blocks.1.attn.z": 32}
    assert m["tokens"] == len(reference) == sum(s.tokens for s in reference.shards)
    assert m["prompts_consumed"] == 24 and m["mechkit_version"] == mechkit.__version__
    assert m["config"] == CollectConfig(sites=SITES, batch_size=4, ram_budget_mb=BUDGET_MB, progress=False).to_dict()
    row_bytes = (32 + 32) * 4 + 3 * 8
    for shard in reference.shards:
        assert shard.tokens * row_bytes <= BUDGET_MB * 2**20
        assert shard.bytes == (reference.path / shard.file).stat().st_size
        assert shard.prompts[0] % 4 == 0  # shards start at batch boundaries
    assert reference.verify() is reference


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        ("last", lambda n: [n - 1]),
        ([0, -1, 50], lambda n: [0, n - 1]),  # 50 lies beyond every prompt: skipped
        ([1, 1, -2], lambda n: list(dict.fromkeys([1, n - 2]))),  # duplicates kept once
    ],
)
def test_positions(model, tmp_path, positions, expected):
    prompts = make_prompts()
    store = run(model, tmp_path / "s", positions=positions, dtype=torch.float16)
    pairs = [(i, j) for i, p in enumerate(prompts) for j in expected(len(p))]
    assert list(zip(store.prompt_indices.load().tolist(), store.positions.load().tolist())) == pairs
    values = store["blocks.0.resid_post"].load()
    assert values.dtype == torch.float16
    for row, (i, j) in zip(values[:6], pairs):
        _, cache = model.run_with_cache(model.to_tokens(prompts[i - i % 4 : i - i % 4 + 4]), SITES[0])
        assert torch.equal(row, cache[SITES[0]][i % 4, j].half())


def test_provenance_has_the_keys_caches_and_results_use(model, reference):
    from mechkit.provenance import provenance

    expected = provenance(model, SITES)
    assert set(PROVENANCE_KEYS) == set(expected)
    assert reference.manifest["provenance"] == reference.provenance == expected
    assert reference.provenance["dtype"] == "float32" and reference.provenance["architecture"] == "gpt2"
    _, cache = model.run_with_cache(make_prompts()[:2], SITES)
    assert {k: cache.provenance[k] for k in PROVENANCE_KEYS} == expected


def test_a_config_object_and_keywords_give_the_same_store(model, reference, tmp_path):
    config = CollectConfig(sites=SITES, batch_size=3, ram_budget_mb=BUDGET_MB, progress=False)
    store = collect(model, make_prompts(), out_dir=tmp_path / "s", config=config, batch_size=4)  # keywords win
    assert_same_store(store, reference)
    assert store.config == config.replace(batch_size=4) and store.manifest["batch_size"] == 4
    with pytest.raises(ConfigError, match="did you mean 'token_budget'"):
        collect(model, make_prompts(), SITES, tmp_path / "t", token_budgt=3)
    with pytest.raises(MechkitError, match="collect needs sites"):
        collect(model, make_prompts(), out_dir=tmp_path / "t")
    with pytest.raises(MechkitError, match="collect needs out_dir"):
        collect(model, make_prompts(), config=config)


def test_stores_written_before_provenance_and_config_were_recorded(model, reference, tmp_path):
    """Version-1 manifests without 'provenance' and 'config' still read, and resume adds both."""
    store = run(model, tmp_path / "s")
    manifest = json.loads((store.path / "manifest.json").read_text())
    kept = manifest["shards"][:2]
    legacy = {k: v for k, v in manifest.items() if k not in ("provenance", "config")}
    legacy |= {"shards": kept, "status": "partial", "tokens": sum(s["tokens"] for s in kept),
               "prompts_consumed": kept[-1]["prompts"][1]}
    (store.path / "manifest.json").write_text(json.dumps(legacy))
    old = ActivationStore(store.path)
    assert old.config is None and old.provenance["architecture"] is None
    assert old.provenance["model"] == manifest["model"] and set(old.provenance) == set(PROVENANCE_KEYS)
    assert torch.equal(old[SITES[0]].load(), reference[SITES[0]][: len(old)])
    resumed = run(model, store.path)
    assert_same_store(resumed, reference)
    assert resumed.manifest["provenance"] == manifest["provenance"] and resumed.config == store.config


def test_unknown_format_version_is_a_clear_error(reference, tmp_path):
    import shutil

    copy = Path(shutil.copytree(reference.path, tmp_path / "s"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"format_version": 7}))
    with pytest.raises(StoreError, match=r"format version 7; this mechkit reads version 1.*re-collect"):
        ActivationStore(copy)


def test_positions_no_prompt_reaches_are_an_error(model, tmp_path):
    with pytest.raises(MechkitError, match=r"no prompt reaches any of positions \[100\]: the longest has 11 real "
                                           r"tokens.*positions='last'"):
        run(model, tmp_path / "s", positions=[100])
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert len(run(model, tmp_path / "s", positions=[10])) > 0  # the same folder is usable afterwards


def test_batches_in_which_no_prompt_reaches_a_position_are_skipped(model, tmp_path, monkeypatch):
    prompts = [[5] * 3, [6] * 4, [7] * 12, [8] * 2, [9] * 5, [10] * 11]  # batches of 2: only the 2nd and 3rd reach 10
    calls = []
    original = model.run_with_cache
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: calls.append(1) or original(*a, **k))
    store = run(model, tmp_path / "s", prompts=prompts, positions=[10, -1], batch_size=2)
    assert len(calls) == 3  # every batch has a last token; with positions=[10] only two would run
    pairs = list(zip(store.prompt_indices.load().tolist(), store.positions.load().tolist()))
    assert pairs == [(0, 2), (1, 3), (2, 10), (2, 11), (3, 1), (4, 4), (5, 10)]
    calls.clear()
    store = run(model, tmp_path / "t", prompts=prompts, positions=[10], batch_size=2)
    assert len(calls) == 2 and store.prompt_indices.load().tolist() == [2, 5]
    assert store.manifest["prompts_consumed"] == 6 and store.complete


def test_token_budget_keeps_exactly_the_first_rows(model, reference, tmp_path):
    store = run(model, tmp_path / "s", token_budget=50)
    assert len(store) == 50 and store.complete
    assert torch.equal(store[SITES[1]].load(), reference[SITES[1]][:50])


def test_text_prompts_go_through_the_tokenizer(tmp_path):
    class Chars:  # a minimal tokenizer: one token per character
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text):
            return {"input_ids": [2 + ord(c) % 90 for c in text]}

    model = mechkit.load(tiny_hf_model("gpt2"), tokenizer=Chars())
    store = run(model, tmp_path / "s", prompts=["hello", "a much longer prompt", "hi"])
    assert store.token_ids.load().tolist() == [2 + ord(c) % 90 for c in "helloa much longer prompthi"]


def test_complete_store_is_returned_without_running_the_model(model, reference, tmp_path, monkeypatch):
    run(model, tmp_path / "s")
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("the model ran again"))
    assert_same_store(run(model, tmp_path / "s"), reference)


# -- reading ------------------------------------------------------------------------------------
def test_column_indexing_matches_the_loaded_tensor(reference):
    column = reference[SITES[0]]
    full = column.load()
    n = len(full)
    assert column.shape == (n, 32) and len(list(column)) == len(reference.shards)
    assert torch.equal(column[5], full[5]) and torch.equal(column[-1], full[-1])
    assert torch.equal(column[3 : n - 2 : 7], full[3 : n - 2 : 7])
    assert torch.equal(column[::-5], full.flip(0)[::5])
    idx = [n - 1, 0, 17, 17, 60]
    assert torch.equal(column[idx], full[idx]) and torch.equal(column[torch.tensor(idx)], full[idx])
    with pytest.raises(IndexError, match="out of range"):
        column[n]
    with pytest.raises(UnknownSiteError, match=r"blocks\.0\.resid_post"):
        reference["blocks.0.resid_pre"]


def test_unshuffled_batches_are_the_rows_in_order(reference):
    batches = list(reference.batches(SITES[0], 10, shuffle=False))
    assert [len(b) for b in batches[:-1]] == [10] * (len(batches) - 1) and 0 < len(batches[-1]) <= 10
    assert torch.equal(torch.cat(batches), reference[SITES[0]].load())


@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 40), buffer_shards=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_shuffled_batches_cover_every_row_once_and_depend_only_on_the_seed(reference, batch_size, buffer_shards, seed):
    rows = reference[SITES[0]].load()
    kwargs = {"seed": seed, "buffer_shards": buffer_shards}
    batches = list(reference.batches(SITES[0], batch_size, **kwargs))
    assert all(len(b) == batch_size for b in batches[:-1])
    got = torch.cat(batches)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rows.tolist()))  # the same multiset
    assert not torch.equal(got, rows)  # actually shuffled
    again = list(reference.batches(SITES[0], batch_size, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(batches, again)) and len(batches) == len(again)
    other = torch.cat(list(reference.batches(SITES[0], batch_size, seed=seed + 1, buffer_shards=buffer_shards)))
    assert not torch.equal(other, got)
    dropped = list(reference.batches(SITES[0], batch_size, drop_last=True, **kwargs))
    assert sum(map(len, dropped)) == len(rows) - len(rows) % batch_size


def test_nothing_is_pickled_or_unpickled(model, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle / torch.load was called")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    store = run(model, tmp_path / "s")
    store.verify()
    store[SITES[0]].load(), store.token_ids[3:9], list(store.batches(SITES[1], 16))
    files = sorted(p.name for p in store.path.iterdir())
    assert files == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(len(store.shards)))]
    for shard in store.shards:
        head = (store.path / shard.file).read_bytes()[:9]
        assert int.from_bytes(head[:8], "little") > 0 and head[8:9] == b"{"  # safetensors: length + JSON header


def test_progress_bar(model, tmp_path, capsys):
    run(model, tmp_path / "s", progress=True)
    assert "collect" in capsys.readouterr().err


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    ("empty prompts", {"prompts": []}, MechkitError, "no prompts"),
    ("a single string", {"prompts": "hello"}, TypeError, "wrap a single prompt in a list"),
    ("mixed prompts", {"prompts": ["a", [1, 2]]}, TypeError, "not a mix"),
    ("budget too small", {"ram_budget_mb": 0.001}, MechkitError, r"too small to hold one batch.*at least 0\.0\d"),
    ("unknown site", {"sites": ["blocks.0.resid_postt"]}, UnknownSiteError, "blocks.0.resid_post"),
    ("not per token", {"sites": ["blocks.0.attn.pattern"]}, MechkitError, "not one vector per token"),
    ("bad positions", {"positions": "first"}, MechkitError, "positions must be"),
    ("bad positions items", {"positions": [1, "x"]}, MechkitError, "positions must be"),
    ("bad batch size", {"batch_size": 0}, MechkitError, "batch_size must be"),
    ("bad dtype", {"dtype": torch.int8}, MechkitError, "dtype must be"),
    ("bad token budget", {"token_budget": 0}, MechkitError, "token_budget must be"),
]


@pytest.mark.parametrize(("case", "kwargs", "error", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_arguments(model, tmp_path, case, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(model, tmp_path / "s", **kwargs)
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.fixture
def copy(model, tmp_path):
    return run(model, tmp_path / "s").path


MISMATCH = [
    ("another model", {"model": "other"}, "written by another model"),
    ("other sites", {"sites": ["blocks.0.resid_post"]}, "sites: the store has"),
    ("other dtype", {"dtype": torch.float16}, "dtype: the store has 'float32', this call has 'float16'"),
    ("other positions", {"positions": "last"}, "positions: the store has 'all'"),
    ("other batch size", {"batch_size": 3}, "batch_size: the store has 4"),
    ("other prompts", {"prompts": make_prompts(seed=5)}, "prompt list differs"),
]


@pytest.mark.parametrize(("case", "kwargs", "message"), MISMATCH, ids=[c[0] for c in MISMATCH])
def test_store_written_with_other_settings(model, copy, case, kwargs, message):
    other = mechkit.load(tiny_hf_model("gpt2", seed=1)) if kwargs.pop("model", None) else model
    with pytest.raises(StoreError, match=message):
        run(other, copy, **kwargs)


def test_existing_store_without_resume_and_foreign_folders(model, copy, tmp_path):
    with pytest.raises(StoreError, match="already holds an ActivationStore; pass resume=True"):
        run(model, copy, resume=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"is not empty .* holds no manifest.json"):
        run(model, tmp_path / "notes")
