"""TopK SAE training: mechkit against sae-lens end to end, and one training step against sae-lens and sparsify.

(a) End to end, same model, site, architecture, hyper-parameters and training tokens on both sides:
    mechkit collects the activations once into an ActivationStore (``mechkit.activations.collect``)
    and trains from the store (``mechkit.sae.train_sae`` with :class:`SparseTopKTrainingSAE`);
    sae-lens's ``LanguageModelSAETrainingRunner`` runs the model and trains in one loop
    (``override_model`` / ``override_dataset``, offline). The model is the zoo's ``facts-lm``
    (4-layer GPT-2, d_model 128): sae-lens drives it as the HookedTransformer that
    ``mechkit.models.lens_weights`` builds from the same HF weights (its activations at the site are
    checked equal to mechkit's first), and it is small enough that 512k tokens fit the time budget
    on one CPU thread (SmolLM2-135M runs at a few hundred tokens/s here, so either run would be all
    forward pass). Both sides get the same rows of 64 token ids from the zoo's world corpus (sae-lens
    without BOS separators or re-chunking); the final SAEs are scored on the same held-out rows (FVU
    through ``mechkit.sae.functional.fvu``). ``--seeds N`` also trains mechkit's SAE with N other
    seeds, untimed, to show the FVU's spread over seeds; ``--dense-too`` also times mechkit with
    sae-lens's own dense TopK SAE (where the time goes).
(b) One TopK training step (d_in 576, 8× expansion, k 32, batch 4096, no dead latents yet):
    forward, backward, gradient clipping and Adam through sae-lens's ``SAETrainer`` for mechkit's
    sparse SAE and for sae-lens's ``TopKTrainingSAE``; forward, backward, decoder-gradient projection,
    Adam and decoder renormalisation for EleutherAI's sparsify (``pip install eai-sparsify``; skipped
    when absent). Contenders alternate in rounds; the median over rounds after a warm-up is quoted.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/sae.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import mechkit
from mechkit.activations.collect import collect
from mechkit.sae import functional
from mechkit.sae.io import to_inference
from mechkit.sae.sparse_topk import SparseTopKTrainingSAE
from mechkit.sae.train import train_sae

LAYER, CONTEXT = 2, 64
SITE, HOOK = f"blocks.{LAYER}.resid_post", f"blocks.{LAYER}.hook_resid_post"
MODEL_BATCH = 32  # prompts per forward pass, both sides


# -- (b) one training step ------------------------------------------------------------------------
def step_contenders(d_in: int, d_sae: int, k: int, batch: int) -> dict[str, Callable[[torch.Tensor], None]]:
    """name → one training step on a batch (each contender with its own freshly initialised weights)."""
    import sae_lens as sl

    steps = {"mechkit sparse TopK": _trainer_step(SparseTopKTrainingSAE, d_in, d_sae, k, batch),
             "sae-lens TopKTrainingSAE": _trainer_step(sl.TopKTrainingSAE, d_in, d_sae, k, batch)}
    sparsify = _sparsify_step(d_in, d_sae, k)
    if sparsify is not None:
        steps["eai-sparsify SparseCoder"] = sparsify
    return steps


def _trainer_step(cls: type, d_in: int, d_sae: int, k: int, batch: int) -> Callable[[torch.Tensor], None]:
    import sae_lens as sl
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = cls(sl.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=batch, device="cpu",
                           lr=3e-4, lr_end=3e-4, n_checkpoints=0, checkpoint_path=None,
                           logger=sl.LoggingConfig(log_to_wandb=False))
    trainer = sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return lambda x: trainer._train_step(trainer.sae, x)


def _sparsify_step(d_in: int, d_sae: int, k: int) -> Callable[[torch.Tensor], None] | None:
    try:
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    except ImportError as e:
        print(f"eai-sparsify not importable ({e}): skipped (pip install --no-deps eai-sparsify natsort schedulefree)")
        return None
    torch.manual_seed(0)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu")
    opt = torch.optim.Adam(coder.parameters(), lr=3e-4)
    fired = torch.zeros(d_sae, dtype=torch.bool)

    def step(x: torch.Tensor) -> None:
        out = coder(x, dead_mask=None)
        (out.fvu + out.auxk_loss).backward()
        fired[out.latent_indices.flatten()] = True  # its trainer's dead-latent bookkeeping
        coder.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(coder.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()

    return step


def bench_step(args: argparse.Namespace) -> None:
    d_in, d_sae, k, batch = 576, 576 * 8, 32, 4096
    print(f"\n(b) one TopK training step: d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}, "
          f"{args.warmup} warm-up + {args.rounds} timed rounds, contenders interleaved")
    steps = step_contenders(d_in, d_sae, k, batch)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["sae-lens TopKTrainingSAE"]
    for name, m in medians.items():
        print(f"  {name:28s} {m * 1e3:8.1f} ms/step  {batch / m:9.0f} tokens/s  {base / m:5.2f}× sae-lens")
    if "eai-sparsify SparseCoder" in medians:
        ratio = medians["eai-sparsify SparseCoder"] / medians["mechkit sparse TopK"]
        print(f"  mechkit / sparsify step speed: {ratio:.2f}×")


# -- (a) end to end ---------------------------------------------------------------------------------
def token_rows(tokenizer: Any, n_rows: int) -> list[list[int]]:
    """``n_rows`` rows of ``CONTEXT`` token ids cut from the world corpus (sentences joined by EOS)."""
    from mechkit.tasks import corpus

    stream: list[int] = []
    repeats = 1
    while len(stream) < n_rows * CONTEXT:
        stream = []
        for sentence in corpus(repeats=repeats):
            stream += tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        repeats *= 2
    return [stream[i * CONTEXT:(i + 1) * CONTEXT] for i in range(n_rows)]


def mechkit_run(model: Any, rows: list[list[int]], args: argparse.Namespace, work: Path, sparse: bool,
                phases: dict[str, float]) -> Any:
    """Collect once into a store, then train from it (the sparse SAE wired in where sae-lens's is built);
    the seconds each phase took go into ``phases``."""
    start = time.perf_counter()
    store = collect(model, rows, [SITE], work / "store", batch_size=MODEL_BATCH, progress=False)
    phases["collect"] = time.perf_counter() - start
    wiring = mock.patch("sae_lens.TopKTrainingSAE", SparseTopKTrainingSAE) if sparse else contextlib.nullcontext()
    with wiring:
        sae = train_sae(store, SITE, d_sae=args.d_sae, k=args.k, tokens=args.tokens, batch_size=args.batch,
                        lr=3e-4, seed=0, dead_window=args.tokens, progress=False)
    phases["train"] = time.perf_counter() - start - phases["collect"]
    with wiring:  # untimed: the spread of the final FVU over seeds, for "equal FVU"
        phases["seeds"] = [train_sae(store, SITE, d_sae=args.d_sae, k=args.k, tokens=args.tokens,
                                     batch_size=args.batch, lr=3e-4, seed=seed, dead_window=args.tokens,
                                     progress=False) for seed in range(1, 1 + (args.seeds if sparse else 0))]
    return sae


def saelens_run(ht: Any, rows: list[list[int]], args: argparse.Namespace, work: Path) -> Any:
    import datasets
    import sae_lens as sl

    cfg = sl.LanguageModelSAERunnerConfig(
        sae=sl.TopKTrainingSAEConfig(d_in=ht.cfg.d_model, d_sae=args.d_sae, k=args.k),
        model_name="facts-lm", hook_name=HOOK, dataset_path="override", is_dataset_tokenized=True,
        streaming=False, context_size=CONTEXT, prepend_bos=False, disable_concat_sequences=True,
        sequence_separator_token=None, training_tokens=args.tokens,  # the rows as given, no BOS between them
        train_batch_size_tokens=args.batch, store_batch_size_prompts=MODEL_BATCH,
        n_batches_in_buffer=2 * args.batch // CONTEXT, lr=3e-4, device="cpu",
        dead_feature_window=args.tokens // args.batch, seed=0, checkpoint_path=None, output_path=str(work / "sl"),
        n_checkpoints=0, verbose=False, logger=sl.LoggingConfig(log_to_wandb=False))
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    torch.manual_seed(0)  # the SAE's initialisation
    return sl.LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=ht).run()


def bench_end_to_end(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from mechkit.models.lens_weights import hooked_transformer_from_hf
    from mechkit.zoo.registry import resolve

    model = mechkit.load("zoo:facts-lm")
    ht = hooked_transformer_from_hf(AutoModelForCausalLM.from_pretrained(resolve("facts-lm")).eval()).eval()
    n_train = args.tokens // CONTEXT
    rows = token_rows(model.tokenizer, n_train + args.eval_rows)
    train_rows, eval_rows = rows[:n_train], rows[n_train:]
    with tempfile.TemporaryDirectory() as tmp:
        held_out = collect(model, eval_rows, [SITE], Path(tmp) / "eval", batch_size=MODEL_BATCH,
                           progress=False)[SITE][:].float()
    _check_same_activations(ht, eval_rows[:MODEL_BATCH], held_out)
    print(f"\n(a) end to end on facts-lm {SITE} (d_model {ht.cfg.d_model}): TopK d_sae {args.d_sae}, k {args.k}, "
          f"batch {args.batch}, lr 3e-4, {args.tokens:,} training tokens in rows of {CONTEXT}; "
          f"FVU on {held_out.shape[0]:,} held-out tokens")
    sparse, dense = "mechkit (store + sparse TopK)", "mechkit (store + sae-lens TopK)"
    phases: dict[str, dict[str, Any]] = {sparse: {}, dense: {}}
    runs = {sparse: lambda w: mechkit_run(model, train_rows, args, w, True, phases[sparse]),
            "sae-lens runner": lambda w: saelens_run(ht, train_rows, args, w),
            dense: lambda w: mechkit_run(model, train_rows, args, w, False, phases[dense])}
    if not args.dense_too:
        del runs[dense]
    results = {}
    for name, run in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            sae = run(Path(tmp))
            elapsed = time.perf_counter() - start
        if name in phases:  # collect + train, without the untimed extra seeds
            elapsed = phases[name]["collect"] + phases[name]["train"]
        results[name] = (elapsed, _fvu(to_inference(sae), held_out))
        others = phases.get(name, {}).pop("seeds", [])
        if others:
            print(f"  {name}: final FVU with seeds 1..{len(others)}: "
                  + ", ".join(f"{_fvu(other, held_out):.4f}" for other in others))
    base = results["sae-lens runner"][0]
    for name, (elapsed, fvu) in results.items():
        split = ", ".join(f"{phase} {t:.1f} s" for phase, t in phases.get(name, {}).items())
        print(f"  {name:32s} {elapsed:7.1f} s  {args.tokens / elapsed:8.0f} tokens/s  {base / elapsed:5.2f}× sae-lens"
              f"  final FVU {fvu:.4f}" + (f"  ({split})" if split else ""))


def _check_same_activations(ht: Any, rows: list[list[int]], held_out: torch.Tensor) -> None:
    """The HookedTransformer sae-lens drives computes mechkit's activations at the site."""
    with torch.no_grad():
        _, cache = ht.run_with_cache(torch.tensor(rows), names_filter=[HOOK], stop_at_layer=LAYER + 1)
    ours = held_out[: len(rows) * CONTEXT]
    theirs = cache[HOOK].reshape(-1, ht.cfg.d_model)
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise SystemExit(f"HookedTransformer and mechkit disagree at {SITE}: max |Δ| {(ours - theirs).abs().max():.2e}")


def _fvu(sae: Any, x: torch.Tensor) -> float:
    with torch.no_grad():
        return functional.fvu(x, sae.decode(sae.encode(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (a smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens end to end (default 512k; quick 65k)")
    parser.add_argument("--d-sae", type=int, default=2048, help="latents end to end (16× facts-lm's d_model)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--eval-rows", type=int, default=256, help="held-out rows of 64 tokens for the FVU")
    parser.add_argument("--rounds", type=int, default=None, help="timed step rounds (default 7; quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=("step", "e2e"), default=None)
    parser.add_argument("--seeds", type=int, default=0,
                        help="also train mechkit's sparse SAE with this many other seeds (untimed): the FVU spread")
    parser.add_argument("--dense-too", action="store_true",
                        help="also time mechkit end to end with sae-lens's dense TopK SAE (where the time goes)")
    args = parser.parse_args()
    args.tokens = args.tokens or (65_536 if args.quick else 524_288)
    args.rounds = args.rounds or (3 if args.quick else 7)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    if args.only != "e2e":
        bench_step(args)
    if args.only != "step":
        bench_end_to_end(args)


if __name__ == "__main__":
    main()
