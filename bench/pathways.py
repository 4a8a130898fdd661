"""All-pairs pathway distance and routing-capture throughput (issue 10).

1. A synthetic routing trace of 5,000 samples × 16 MoE layers × 64 experts at τ = 0.7 (pathway strings of a
   few hundred characters): mechkit's mean pathway distance (``rapidfuzz.process.cdist``, all cores) against
   a single-threaded cdist and a straightforward pure-Python Levenshtein loop timed on a subsample and
   extrapolated to all unordered pairs.
2. Routing capture on moe-grok (every example of its task, 4 tokens each) against its plain forward.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/pathways.py
"""

from __future__ import annotations

import os
import random
import time

import torch
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

import mechkit
from mechkit.moe import capture_routing, mean_pathway_distance, pathway_strings, split_samples
from mechkit.zoo.registry import resolve

N, LAYERS, EXPERTS, TAU, SUBSAMPLE = 5000, 16, 64, 0.7, 60


def levenshtein(a: str, b: str) -> int:
    """Two-row dynamic programme, the textbook way."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def synthetic_strings() -> list[str]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(LAYERS, EXPERTS, generator=g) * 1.5  # shared preferences: samples overlap partly
    layers = [(base[layer] + torch.randn(N, EXPERTS, generator=g)).softmax(-1) for layer in range(LAYERS)]
    return pathway_strings(layers, TAU)


def distances() -> None:
    t0 = time.perf_counter()
    strings = synthetic_strings()
    t_strings = time.perf_counter() - t0
    lengths = torch.tensor([len(s) for s in strings]).double()
    print(f"{N} samples, {LAYERS} layers, {EXPERTS} experts, tau {TAU}: strings of {lengths.mean():.0f} characters "
          f"(min {lengths.min():.0f}, max {lengths.max():.0f}), built in {t_strings:.2f} s; {os.cpu_count()} cores")
    t0 = time.perf_counter()
    mean = mean_pathway_distance(strings, max_samples=None)
    t_mechkit = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = cdist(strings, strings, scorer=Levenshtein.distance, workers=1)
    t_single = time.perf_counter() - t0
    assert abs(float(single.sum()) / (N * (N - 1)) - mean) < 1e-9
    rng = random.Random(0)
    pairs = [(rng.randrange(N), rng.randrange(N)) for _ in range(SUBSAMPLE)]
    t0 = time.perf_counter()
    for i, j in pairs:
        assert levenshtein(strings[i], strings[j]) == single[i, j]
    per_pair = (time.perf_counter() - t0) / SUBSAMPLE
    t_python = per_pair * N * (N - 1) / 2
    print(f"mean pathway distance {mean:.2f}")
    print(f"mechkit (cdist, workers=-1, {N}² cells): {t_mechkit:.1f} s")
    print(f"rapidfuzz cdist, one worker:             {t_single:.1f} s   mechkit is {t_single / t_mechkit:.2f}x faster")
    print(f"pure Python, {per_pair * 1e3:.1f} ms a pair × {N * (N - 1) // 2:,} pairs ≈ {t_python:,.0f} s "
          f"({t_python / 3600:.1f} h)   mechkit is {t_python / t_mechkit:,.0f}x faster")


def capture() -> None:
    model = mechkit.load("zoo:moe-grok")
    train, test = split_samples(resolve("moe-grok"))
    prompts = [p for p, _ in train + test]
    ids = model.tokenize(prompts)
    tokens = int(ids.attention_mask.sum())
    timings = {"capture": [], "forward": []}
    for _ in range(3):
        t0 = time.perf_counter()
        capture_routing(model, prompts, batch_size=512)
        timings["capture"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(prompts), 512):
                model.torch_module(ids.input_ids[start:start + 512])
        timings["forward"].append(time.perf_counter() - t0)
    cap, fwd = sorted(timings["capture"])[1], sorted(timings["forward"])[1]
    print(f"moe-grok, {len(prompts)} prompts, {tokens} tokens, batches of 512 (median of 3):")
    print(f"routing capture {tokens / cap:,.0f} tokens/s ({cap:.2f} s), plain HF forward {tokens / fwd:,.0f} "
          f"tokens/s ({fwd:.2f} s): capture runs at {fwd / cap:.2f}x the plain forward's speed")


def main() -> None:
    torch.set_num_threads(1)
    distances()
    capture()


if __name__ == "__main__":
    main()
