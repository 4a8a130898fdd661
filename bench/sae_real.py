"""A TopK SAE on SmolLM2-135M's real weights, mid layer, trained on Python's own docstrings.

No dataset can be downloaded here, so the text is the standard library's docstrings
(:func:`mechkit.tasks.docstrings.python_docstrings`: ~1,000 prose paragraphs, ~45k tokens), split
90 / 10 into SAE training and held-out evaluation paragraphs. Activations of real tokens at
``blocks.15.resid_post`` are collected once; the SAE (8× expansion, k 32) trains on them in epochs;
each prompt's first token (an attention sink) is left out of training and evaluation;
evaluation splices it into the model on the held-out paragraphs (L0, FVU, CE-loss recovered against
zero and mean ablation, KL). With ``--out DIR`` the SAE is saved there and the top contexts of a few
latents are written as HTML (the SAE notebook shows them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_real.py [--tokens 800000] [--cache FILE] [--out bench/sae_smollm2]
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


def activations(model, prompts: list[str], cache: str | None, batch_size: int = 8) -> torch.Tensor:
    """Rows of real tokens after each prompt's first (the attention sink: norms ~100× the rest),
    kept in ``cache`` (safetensors) so a rerun skips the model."""
    from safetensors.torch import load_file, save_file

    if cache and os.path.isfile(cache):
        return load_file(cache)["x"]
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(prompts[start:start + batch_size])
        keep = batch.attention_mask.bool()
        keep[:, 0] = False
        rows.append(model.run_with_cache(batch, SITE).cache[SITE][keep])
    x = torch.cat(rows)
    if cache:
        save_file({"x": x}, cache)
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=800_000, help="training rows in total (epochs over the set)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for the SAE and its top-context HTML")
    parser.add_argument("--cache", default=None, help="safetensors file caching the training activations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = mechkit.load("zoo:smollm2-135m")
    paragraphs = python_docstrings(seed=0)
    cut = len(paragraphs) * 9 // 10
    train_text, held_out = paragraphs[:cut], paragraphs[cut:]
    start = time.perf_counter()
    x = activations(model, train_text, args.cache)
    norms = x.norm(dim=-1)
    massive = norms > 10 * norms.median()  # rare massive activations (norm ~100× the rest) would own the loss
    print(f"{len(train_text)} training paragraphs → {x.shape[0]:,} token rows at {SITE} in "
          f"{time.perf_counter() - start:.0f} s; norm median {norms.median():.1f}, max {norms.max():.1f}; "
          f"{int(massive.sum())} rows above 10× the median left out")
    x = x[~massive]
    start = time.perf_counter()
    sae = train_sae(x, SITE, d_sae=args.expansion * x.shape[1], k=args.k, tokens=args.tokens,
                    batch_size=args.batch_size, lr=args.lr, progress=True)
    train_s = time.perf_counter() - start
    result = evaluate_sae(model, sae, SITE, held_out, batch_size=8, skip_first=1, progress=True)
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
        write_top_contexts(model, sae, held_out, os.path.join(args.out, "top_contexts.html"))
        print(f"wrote {args.out}")


def write_top_contexts(model, sae, prompts: list[str], path: str, n_latents: int = 8) -> None:
    """Top contexts of latents spread over the firing-frequency range (the most frequent ones are
    often positional or generic), as one HTML file."""
    from mechkit.sae import top_contexts

    contexts = top_contexts(model, sae, SITE, prompts, k=6, batch_size=8)
    alive = contexts.frequency.argsort(descending=True)[: int((contexts.frequency > 0).sum())]
    picks = alive[torch.linspace(len(alive) // 10, len(alive) - 1, n_latents).long()]
    with open(path, "w") as f:
        f.write("".join(contexts.html(int(i)) for i in picks))


if __name__ == "__main__":
    main()
