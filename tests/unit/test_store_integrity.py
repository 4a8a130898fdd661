"""Damaged stores: every read path refuses a damaged shard, and resume re-collects it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import mechkit
from mechkit.activations import integrity
from mechkit.activations.store import ActivationStore
from mechkit.errors import StoreError
from tests.conftest import tiny_hf_model
from tests.unit.test_store import SITES, assert_same_store, run

DAMAGED = "shard-00001.safetensors"
REPAIR = r"re-run collect\(\.\.\.\) with the same arguments"


@pytest.fixture(scope="module")
def model():
    return mechkit.load(tiny_hf_model("gpt2"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return run(model, tmp_path_factory.mktemp("ref") / "s")


@pytest.fixture
def copy(model, tmp_path):
    return run(model, tmp_path / "s").path


def damage(path: Path, shard: str, how: str) -> None:
    file = path / shard
    data = bytearray(file.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")  # after the length and the JSON header
    if how == "truncate":
        data = data[: len(data) - 100]
    elif how == "flip":  # one bit in the middle of the tensor bytes: size and header still look fine
        data[(data_start + len(data)) // 2] ^= 0x04
    elif how == "header":
        data[12] = ord("!")
    file.write_bytes(bytes(data))


def rows_of_shard(store: ActivationStore, i: int) -> slice:
    return slice(store._offsets[i], store._offsets[i + 1])


@pytest.mark.parametrize(
    ("how", "message"),
    [("truncate", "truncated"), ("flip", "corrupted: its sha256"), ("header", "unreadable safetensors header")],
)
def test_damaged_shard_is_named_by_verify(copy, how, message):
    damage(copy, DAMAGED, how)
    with pytest.raises(StoreError, match=f"{DAMAGED}.*{message}.*{REPAIR}"):
        ActivationStore(copy).verify()


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_every_read_refuses_a_damaged_shard(copy, how):
    damage(copy, DAMAGED, how)
    store = ActivationStore(copy)
    first = store[SITES[0]].shard(0)
    assert torch.equal(first, store[SITES[0]][rows_of_shard(store, 0)])  # undamaged shards stay readable
    inside = rows_of_shard(store, 1)
    reads = {
        "load": lambda: store[SITES[1]].load(),
        "row": lambda: store[SITES[1]][inside.start],
        "slice": lambda: store[SITES[0]][inside],
        "gather": lambda: store.token_ids[[0, inside.start]],
        "iteration": lambda: list(store[SITES[0]]),
        "batches": lambda: list(store.batches(SITES[0], 8)),
        "unshuffled batches": lambda: list(store.batches(SITES[1], 8, shuffle=False)),
    }
    for name, read in reads.items():
        with pytest.raises(StoreError, match=f"{DAMAGED}.*{REPAIR}"):
            read()
            pytest.fail(f"{name} served a damaged shard")


def test_each_shard_is_hashed_once_per_process(copy, monkeypatch):
    hashed = []
    original = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(Path(path).name) or original(path))
    store = ActivationStore(copy)
    store[SITES[0]].load(), store[SITES[1]][3:40], list(store.batches(SITES[0], 16))
    ActivationStore(copy).token_ids.load()  # another store object on the same folder
    assert sorted(hashed) == sorted(s.file for s in store.shards)
    store.verify()  # an explicit verify hashes everything again
    assert len(hashed) == 2 * len(store.shards)


def test_a_shard_rewritten_after_it_was_verified_is_checked_again(copy):
    store = ActivationStore(copy)
    store[SITES[0]].load()  # every shard verified
    file = copy / DAMAGED
    stat = file.stat()
    damage(copy, DAMAGED, "flip")
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, even on coarse clocks
    with pytest.raises(StoreError, match=f"{DAMAGED} in .* is corrupted"):
        store[SITES[0]].load()


@pytest.mark.parametrize("how", ["delete", "flip", "truncate"])
def test_resume_recollects_a_damaged_shard_and_everything_after_it(model, reference, copy, how):
    if how == "delete":
        (copy / DAMAGED).unlink()
    else:
        damage(copy, DAMAGED, how)
    calls = []
    original = model.run_with_cache
    model.run_with_cache = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with pytest.warns(UserWarning, match=f"{DAMAGED} .*re-collecting from prompt"):
            store = run(model, copy)  # the store was complete: without the check it would be returned as is
    finally:
        del model.run_with_cache
    assert calls and len(calls) < 24 // 4  # the shards before the damaged one were kept
    assert_same_store(store, reference)
    assert [s.sha256 for s in store.verify().shards] == [s.sha256 for s in reference.shards]


def test_missing_shard_and_missing_or_broken_manifest(copy, tmp_path):
    (copy / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shard-00002.safetensors in .* is missing"):
        ActivationStore(copy).verify()
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore(tmp_path / "nowhere")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json is unreadable"):
        ActivationStore(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"has no manifest.json"):
        ActivationStore(copy)


def test_resume_after_a_crash_between_shard_and_manifest(model, reference, copy):
    """Rewind the manifest to two shards, leave later shard files (one half-written) and a temp file."""
    manifest = json.loads((copy / "manifest.json").read_text())
    kept = manifest["shards"][:2]
    manifest |= {"shards": kept, "status": "partial", "tokens": sum(s["tokens"] for s in kept),
                 "prompts_consumed": kept[-1]["prompts"][1]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    damage(copy, "shard-00002.safetensors", "truncate")  # an orphan, not in the manifest
    (copy / ".tmp-abc.part").write_bytes(b"partial")
    assert not ActivationStore(copy).complete and len(ActivationStore(copy)) < len(reference)
    calls = []
    original = model.run_with_cache
    model.run_with_cache = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        store = run(model, copy)
    finally:
        del model.run_with_cache
    assert len(calls) == (24 - manifest["prompts_consumed"]) // 4  # only the missing batches ran
    assert_same_store(store, reference)
    assert not (copy / ".tmp-abc.part").exists() and store.verify().complete
