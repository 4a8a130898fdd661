"""Collection into an ActivationStore: memory against the RAM budget, and throughput.

A GPT-2-shaped model (4 layers, d_model 256, vocab 5000, random weights) collects every
``resid_post`` site (float32: 4 KiB per token) for prompts of 128 tokens with ``ram_budget_mb``
(default 64), writing several times that much to disk. A thread samples the process RSS every 2 ms.

What the budget bounds: the buffer of activation rows waiting to be written (at most one shard).
It does not bound the interpreter, the model weights, or the forward pass's own working set
(attention scores, MLP activations, logits — 16·128·5000·4 B ≈ 41 MB of logits alone — plus what
the C allocator keeps after freeing them). While a batch is copied into the buffer, its kept rows
exist twice, so the store's share of memory is at most budget + one batch's rows. To measure that
share, two fresh processes run the same batches: one only captures and drops the activations, the
other collects into a store; the difference of their peak RSS growth over the loaded model is the
store's share, and it should not depend on how much is written. With glibc's default settings
freed heap memory is kept and reused unevenly, which makes single runs noisy (tens of MB); the
runs are repeated with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so that freed blocks go back to
the system and RSS follows live memory.

Reads: shuffled batches, single rows, ``verify()``, and the cost of the sha256 check each shard
gets the first time a process reads it (an epoch and a row read with and without it).

    OMP_NUM_THREADS=1 .venv/bin/python bench/store.py --budget-mb 64 --tokens 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
import transformers

import mechkit
from mechkit.activations import integrity
from mechkit.activations.collect import collect

N_LAYERS, D_MODEL, N_HEADS, VOCAB, SEQ = 4, 256, 8, 5000, 128
SITES = [f"blocks.{i}.resid_post" for i in range(N_LAYERS)]
MB = 2**20


class PeakRSS:
    """Samples RSS in a background thread; ``peak`` is the largest value seen inside the block."""

    def __init__(self, interval: float = 0.002) -> None:
        self.process, self.interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def build_model() -> mechkit.Model:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB,
                                     n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    return mechkit.load(transformers.GPT2LMHeadModel(config).eval())


def child(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in a fresh process: peak RSS growth over the loaded model."""
    model = build_model()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, VOCAB, (-(-args.tokens // SEQ), SEQ), generator=g).tolist()
    baseline = psutil.Process().memory_info().rss
    if mode == "forward":  # the same batches, captured and dropped: the model's own working set
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            for i in range(0, len(prompts), args.batch_size):
                model.run_with_cache(prompts[i : i + args.batch_size], SITES)
            elapsed = time.perf_counter() - t0
        return {"baseline": baseline, "growth": peak.peak - baseline, "seconds": elapsed}
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            store = collect(model, prompts, SITES, root / "store", batch_size=args.batch_size,
                            ram_budget_mb=args.budget_mb, progress=False)
            elapsed = time.perf_counter() - t0
        reads = read_costs(store)
    finally:
        shutil.rmtree(root)
    return {"baseline": baseline, "growth": peak.peak - baseline, "written": store_bytes(store),
            "shards": len(store.shards), "tokens": len(store), "seconds": elapsed, **reads}


def store_bytes(store: mechkit.ActivationStore) -> int:
    return sum(s.bytes for s in store.shards)


def read_costs(store: mechkit.ActivationStore) -> dict[str, float]:
    """Read timings with and without the first-read sha256 check of each shard.

    The first read of a shard in a process hashes the whole file (all sites); later reads do not.
    Forgetting the verified shards stands in for a fresh process. The files were just written, so
    they are in the page cache for every read: the differences are the hashing itself.
    """

    def epoch() -> float:
        t0 = time.perf_counter()
        for _ in store.batches(SITES[-1], 4096, buffer_shards=2):
            pass
        return time.perf_counter() - t0

    def one_row_per_shard() -> float:
        column, t0 = store[SITES[0]], time.perf_counter()
        for start in store._offsets[:-1]:
            column[start]
        return (time.perf_counter() - t0) / len(store.shards)

    integrity._verified.clear()
    epoch_first, epoch_later = epoch(), epoch()
    integrity._verified.clear()
    row_first, row_later = one_row_per_shard(), one_row_per_shard()
    t0 = time.perf_counter()
    store.verify()
    verify_s = time.perf_counter() - t0
    return {"epoch_first_s": epoch_first, "epoch_later_s": epoch_later, "row_first_s": row_first,
            "row_later_s": row_later, "verify_s": verify_s, "verify_mb_s": store_bytes(store) / MB / verify_s}


def run_child(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    """Each measurement in a fresh process, so no heap is left over from another run."""
    cmd = [sys.executable, __file__, "--child", mode, "--budget-mb", str(args.budget_mb),
           "--tokens", str(args.tokens), "--batch-size", str(args.batch_size)]
    cmd += ["--dir", str(args.dir)] if args.dir else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mb", type=float, default=64.0)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens to collect")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a temp folder by default)")
    parser.add_argument("--child", choices=["forward", "collect"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    allocators = {"glibc defaults (noisy)": {}, "MALLOC_MMAP_THRESHOLD_=1MiB": {"MALLOC_MMAP_THRESHOLD_": str(MB)}}
    results = {name: {mode: run_child(mode, args, env) for mode in ("forward", "collect")}
               for name, env in allocators.items()}
    col = results["glibc defaults (noisy)"]["collect"]
    budget = args.budget_mb * MB
    in_transit = args.batch_size * SEQ * (N_LAYERS * D_MODEL * 4 + 3 * 8)  # one batch's kept rows
    print(f"GPT-2 shape: {N_LAYERS} layers, d_model {D_MODEL}, vocab {VOCAB}; batch {args.batch_size}×{SEQ}; "
          f"all resid_post, float32 ({col['tokens']} tokens)")
    print(f"RSS after loading the model:      {col['baseline'] / MB:7.1f} MB")
    print(f"RAM budget (activation buffer):   {args.budget_mb:7.1f} MB   one batch's rows in transit: "
          f"{in_transit / MB:.1f} MB")
    print(f"written to disk:                  {col['written'] / MB:7.1f} MB in {col['shards']} shards "
          f"({col['written'] / budget:.1f}× the budget)")
    print("peak RSS growth over the loaded model (MB):")
    print(f"  {'allocator':<30} {'capture only':>12} {'collect':>9} {'difference':>11}")
    for name, runs in results.items():
        fwd, growth = runs["forward"]["growth"], runs["collect"]["growth"]
        verdict = "yes" if growth - fwd <= budget + in_transit else "NO"
        print(f"  {name:<30} {fwd / MB:12.1f} {growth / MB:9.1f} {(growth - fwd) / MB:11.1f}   "
              f"≤ budget + one batch ({(budget + in_transit) / MB:.1f}): {verdict}")
    fwd = results["glibc defaults (noisy)"]["forward"]
    print(f"collect throughput:               {col['tokens'] / col['seconds']:8.0f} tokens/s "
          f"({col['written'] / MB / col['seconds']:.1f} MB/s)")
    print(f"capture loop only, same batches:  {col['tokens'] / fwd['seconds']:8.0f} tokens/s")
    rows_s = col["tokens"] / col["epoch_later_s"]
    print(f"shuffled batches of 4096 rows:    {rows_s:8.0f} rows/s (one site, shards already verified)")
    print(f"verify() (sha256 of every shard): {col['verify_mb_s']:8.0f} MB/s")
    print(f"first-read sha256 check ({col['written'] / MB:.0f} MB in {col['shards']} shards, once per process):")
    extra = col["epoch_first_s"] - col["epoch_later_s"]
    print(f"  one epoch of batches(), one site: first {col['epoch_first_s']:.3f} s, later {col['epoch_later_s']:.3f} s "
          f"(+{extra:.3f} s, {col['epoch_first_s'] / col['epoch_later_s']:.1f}× the first time)")
    print(f"  one row from a shard:             first {col['row_first_s'] * 1e3:.1f} ms, later "
          f"{col['row_later_s'] * 1e3:.2f} ms")

if __name__ == "__main__":
    main()
