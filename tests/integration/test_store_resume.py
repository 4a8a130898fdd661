"""A collection killed with SIGKILL mid-way resumes and yields exactly the tensors of an uninterrupted run;
a fresh process refuses to read a shard with a flipped byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mechkit
from mechkit.activations.collect import collect
from mechkit.activations.store import ActivationStore
from tests.conftest import VOCAB, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
SITES = ["blocks.0.resid_post", "blocks.1.mlp.post", "blocks.1.attn.z.h2"]
SETTINGS = {"batch_size": 4, "ram_budget_mb": 0.05, "dtype": torch.float16}
N_PROMPTS = 120

# The child collects the same prompts with the same model, slowed down per batch so the parent can
# kill it while shards are being written.
CHILD = """
import sys, time, torch
torch.set_num_threads(1)
import mechkit
from mechkit.activations.collect import collect
from tests.conftest import tiny_hf_model
from tests.integration.test_store_resume import SETTINGS, SITES, prompts
model = mechkit.load(tiny_hf_model("gpt2"))
run = model.run_with_cache
model.run_with_cache = lambda *a, **k: (time.sleep(0.05), run(*a, **k))[1]
collect(model, prompts(), SITES, sys.argv[1], progress=False, **SETTINGS)
"""


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 16, (N_PROMPTS,), generator=g)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def shards_listed(path: Path) -> int:
    try:
        return len(json.loads((path / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):  # not written yet (the rename makes a half-read impossible)
        return 0


def kill_after_shards(out: Path, n: int, timeout: float = 60.0) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while shards_listed(out) < n:
            if child.poll() is not None:
                pytest.fail(f"the collecting child exited early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the collecting child wrote no shards in time")
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stderr.close()


def test_killed_collection_resumes_to_identical_tensors(tmp_path):
    model = mechkit.load(tiny_hf_model("gpt2"))
    reference = collect(model, prompts(), SITES, tmp_path / "ref", progress=False, **SETTINGS)
    assert len(reference.shards) >= 6

    out = tmp_path / "killed"
    kill_after_shards(out, 2)
    interrupted = ActivationStore(out)
    assert not interrupted.complete and 2 <= len(interrupted.shards) < len(reference.shards)
    done_before = interrupted.manifest["prompts_consumed"]
    interrupted[SITES[0]].load()  # the shards it lists are complete and readable

    calls = []
    run = model.run_with_cache
    model.run_with_cache = lambda *a, **k: calls.append(1) or run(*a, **k)
    resumed = collect(model, prompts(), SITES, out, progress=False, **SETTINGS)
    assert len(calls) == -(-(N_PROMPTS - done_before) // 4)  # continued; did not start over

    assert resumed.complete and len(resumed) == len(reference)
    for site in SITES:
        assert torch.equal(resumed[site].load(), reference[site].load())
    for column in ("token_ids", "prompt_indices", "positions"):
        assert torch.equal(getattr(resumed, column).load(), getattr(reference, column).load())
    # the same batches flushed at the same points: even the shard files are byte-identical
    assert [s.sha256 for s in resumed.verify().shards] == [s.sha256 for s in reference.shards]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


READER = """
import sys
from mechkit.activations.store import ActivationStore
from mechkit.errors import StoreError
try:
    ActivationStore(sys.argv[1])[sys.argv[2]].load()
except StoreError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_fresh_process_refuses_a_flipped_byte(tmp_path):
    model = mechkit.load(tiny_hf_model("gpt2"))
    store = collect(model, prompts()[:40], SITES, tmp_path / "s", progress=False, **SETTINGS)
    shard = store.path / store.shards[1].file
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # inside the last site's tensor bytes
    shard.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", READER, str(store.path), SITES[0]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{shard.name} in" in done.stdout and "is corrupted" in done.stdout
