"""Activation patching: mechkit's batched sweeps against TransformerLens's ``patching`` module.

Same HookedTransformer (built from the HF weights), same prompt pairs, same normalised logit-diff
metric: residual stream × position (``get_act_patch_resid_pre``), head outputs over all positions
(``get_act_patch_attn_head_out_all_pos``) and, on facts-lm, head outputs × position. mechkit runs
through its lens backend on that very HookedTransformer and through torch_hooks on the HF model.
Prints wall times, ratios and the largest difference of the scores. Real IOI prompts on SmolLM2-135M
(``--model smollm2``, ~25 min here) or synthetic IOI on facts-lm (default, ~1 min).

    OMP_NUM_THREADS=1 .venv/bin/python bench/patching.py [--model smollm2] [--pairs 8]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens import patching as tlp

import mechkit
from mechkit import tasks
from mechkit.models.lens import LensModel, hooked_transformer_from_gpt2, hooked_transformer_from_llama
from mechkit.patching import activation_patching, logit_diff, make_pairs, recovery


def equal_length_pairs(model, task: str, n: int):
    """``n`` pairs of the most common length (TransformerLens's functions take one unpadded batch)."""
    every = make_pairs(model, tasks.generate(task, 10 * n, 0))
    length = collections.Counter(every.lengths.tolist()).most_common(1)[0][0]
    return every.select((every.lengths == length).nonzero().flatten()[:n])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("facts-lm", "smollm2"), default="facts-lm")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--cases", default="resid,heads,heads_by_pos",
                        help="comma-separated subset of resid, heads, heads_by_pos (the last on facts-lm only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "smollm2":
        ref = mechkit.load("zoo:smollm2-135m")
        ht = hooked_transformer_from_llama(ref.torch_module, n_ctx=64)
        pairs = equal_length_pairs(ref, "ioi_wang", args.pairs or 8)
    else:
        ref = mechkit.load("zoo:facts-lm")
        hf = ref.torch_module
        ht = (hooked_transformer_from_gpt2(hf) if ref.info.architecture == "gpt2"
              else hooked_transformer_from_llama(hf, n_ctx=hf.config.max_position_embeddings))
        pairs = equal_length_pairs(ref, "ioi", args.pairs or 16)
    lens = LensModel(ht, tokenizer=ref.tokenizer)
    layers, heads = ht.cfg.n_layers, ht.cfg.n_heads
    tokens = pairs.corrupt.input_ids
    with torch.no_grad():
        clean_logits, cache = ht.run_with_cache(pairs.clean.input_ids)
        m_clean, m_corrupt = logit_diff(clean_logits, pairs).mean(), logit_diff(ht(tokens), pairs).mean()
    print(f"{args.model}: {len(pairs)} pairs of {int(pairs.lengths[0])} tokens; logit diff clean {m_clean:.2f}, "
          f"corrupt {m_corrupt:.2f}")

    def metric(logits):
        return recovery(logit_diff(logits, pairs).mean(), m_clean, m_corrupt).float()

    cases = [
        ("resid", "resid_pre × position", tlp.get_act_patch_resid_pre, {"sites": "blocks.*.resid_pre"}, lambda s: s),
        ("heads", "head output, all positions", tlp.get_act_patch_attn_head_out_all_pos,
         {"sites": "blocks.*.attn.z", "positions": "all"}, lambda s: s.reshape(layers, heads)),
    ]
    if args.model == "facts-lm":
        cases.append(("heads_by_pos", "head output × position", tlp.get_act_patch_attn_head_out_by_pos,
                      {"sites": "blocks.*.attn.z"}, lambda s: s.reshape(layers, heads, -1).permute(0, 2, 1)))
    wanted = args.cases.split(",")
    for key, name, tl_fn, options, shape in cases:
        if key not in wanted:
            continue
        with torch.no_grad():
            t_tl, tl = timed(tl_fn, ht, tokens, cache, metric)
        t_lens, ours = timed(activation_patching, lens, pairs, **options)
        t_hooks, _ = timed(activation_patching, ref, pairs, **options)
        diff = float((shape(ours.scores) - tl).abs().max())
        print(f"{name:28s} TransformerLens {t_tl:7.2f} s | mechkit lens {t_lens:7.2f} s ({t_tl / t_lens:4.1f}×) | "
              f"mechkit torch_hooks {t_hooks:7.2f} s ({t_tl / t_hooks:4.1f}×) | max |diff| {diff:.1e}")
        top = ours.top(4)
        print("   top cells:", ", ".join(" ".join(str(row[a]) for a in ours.axes) + f" = {row.score:.2f}"
                                         for _, row in top.iterrows()))


if __name__ == "__main__":
    main()
