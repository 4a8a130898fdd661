"""A TopK SAE on SmolLM2-135M's real weights, mid layer, trained on Python's own docstrings.

No dataset can be downloaded here, so the text is the standard library's docstrings
(:func:`mechkit.tasks.docstrings.python_docstrings`: ~1,000 prose paragraphs, ~45k tokens), split
90 / 10 into SAE training and held-out evaluation paragraphs. Activations of real tokens at
``blocks.15.resid_post`` are collected once; the SAE (8× expansion, k 32) trains on them in epochs;
evaluation splices it into the model on the held-out paragraphs (L0, FVU, CE-loss recovered against
zero and mean ablation, KL). With ``--out DIR`` the SAE is saved there and the top contexts of a few
latents are written as HTML (the SAE notebook shows them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_real.py [--tokens 1200000] [--out bench/sae_smollm2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import mechkit
from mechkit.sae import evaluate_sae, train_sae
from mechkit.tasks.docstrings import python_docstrings

SITE = "blocks.15.resid_post"


def activations(model, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(prompts[start:start + batch_size])
        rows.append(model.run_with_cache(batch, SITE).cache[SITE][batch.attention_mask.bool()])
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_200_000, help="training rows in total (epochs over the set)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for the SAE and its top-context HTML")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = mechkit.load("zoo:smollm2-135m")
    paragraphs = python_docstrings(seed=0)
    cut = len(paragraphs) * 9 // 10
    train_text, held_out = paragraphs[:cut], paragraphs[cut:]
    start = time.perf_counter()
    x = activations(model, train_text)
    norms = x.norm(dim=-1)
    print(f"{len(train_text)} training paragraphs → {x.shape[0]:,} token rows at {SITE} in "
          f"{time.perf_counter() - start:.0f} s; norm median {norms.median():.1f}, max {norms.max():.1f}")
    start = time.perf_counter()
    sae = train_sae(x, SITE, d_sae=args.expansion * x.shape[1], k=args.k, tokens=args.tokens, batch_size=4096,
                    lr=5e-4, progress=True)
    train_s = time.perf_counter() - start
    result = evaluate_sae(model, sae, SITE, held_out, batch_size=8, progress=True)
    m = result.metrics()
    print(f"trained {args.tokens:,} rows in {train_s:.0f} s ({args.tokens / train_s:,.0f} rows/s)")
    print(f"held out: {len(held_out)} paragraphs, {result.n_tokens:,} tokens")
    print(f"L0 {m['l0']:.1f} · FVU {m['fvu']:.3f} · cosine {m['cosine']:.3f} · dead {m['dead_fraction']:.3f} · "
          f"dense {m['dense_fraction']:.3f}")
    print(f"CE clean {m['ce_clean']:.3f} · SAE {m['ce_sae']:.3f} · zero-abl {m['ce_zero']:.3f} · "
          f"mean-abl {m['ce_mean']:.3f} → recovered {m['recovered_zero']:.3f} (zero), {m['recovered_mean']:.3f} "
          f"(mean) · KL {m['kl']:.3f}")
    if args.out:
        from mechkit.sae.io import save_sae

        save_sae(sae, args.out, site=SITE, model=model)
        result.save(os.path.join(args.out, "eval"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
