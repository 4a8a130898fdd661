"""Recipe for ``moe-grok-deep``: a 6-layer OLMoE (8 experts, top-2) that groks (a+b) and (a-b) mod 31,
plus a label-shuffled control trained under the same schedule.

``moe-grok`` has two MoE layers, so a pathway's layer-to-layer consistency has a single layer pair
and cannot move; this model has six. Prompts are ``"a + b ="`` / ``"a - b ="``, the answer is read at
the last position; half of the 2·31² examples train, full batch, AdamW (lr 3e-3, weight decay 2.0,
betas 0.9/0.98, gradient norm clipped at 1.0) plus a router load-balancing loss (0.02) applied to
every layer on its own (OLMoE's own loss pools all layers, and under it single experts of single
layers fell below 1% of the routed tokens). Without the clipping Adam's loss spikes recur every
100-200 steps and test accuracy stalls near 90%. Train accuracy saturates early, test accuracy much
later; candidates are evaluated every 5 steps up to step 200 to locate memorisation finely.
The control permutes the training labels once (``shuffle_seed``): it memorises
and has nothing to generalise. Both series ship 22 fp16 checkpoints (loading computes in fp32)::

    out/            the main series (grok.train layout: card.json, checkpoints/, split.safetensors, ...)
    out/control/    the label-shuffled control, same layout

Two settings serve the pathway-consistency metric of METHODS §6, whose routing embedding
Σ_k ḡ_k W_ℓ[k] depends on each router's mean expert row although the softmax over experts cannot
see it: ``center_router`` removes that row after every step (the model's function is unchanged;
without it Adam's per-coordinate steps grow the row until it dominates every embedding, and
smoothness fell from 0.94 to 0.5 while the model generalised), and the learning rate stays
constant after the warm-up: under a final cosine decay the smoothness of the centred routers rose
with test accuracy and then fell back during the decay (r +0.42 with a decay over the last 25%,
+0.46 over the last 10%; +0.69 at a constant rate, where test accuracy ends at 92% after reaching
95%). ``bench/RESULTS.md`` lists every variant measured.

The cards add a ``routing`` entry measured on the final weights: the share of routed token slots
each expert of each layer receives on the training set, and the number of distinct pathway strings
(METHODS §6: token-averaged router probabilities, shortest prefix of experts with cumulative
weight > τ) among the training samples.

    OMP_NUM_THREADS=1 mechkit zoo train moe-grok-deep
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from mechkit import atomic
from mechkit.tasks import modarith
from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import folders, grok

NAME = "moe-grok-deep"
SEED = 0
CONTROL_DIR = "control"
"""Sub-folder of the main folder that holds the label-shuffled control series."""
SHUFFLE_SEED = 1
AUX_LOSS_COEF = 0.02
TAUS = (0.5, 0.7, 0.8)
Series = Literal["main", "control", "both"]


def spec(*, steps: int | None = None, smoke: bool = False, control: bool = False) -> grok.RunSpec:
    """The run settings of the main series or (``control``) the label-shuffled control; ``smoke``:
    a tiny model and a few steps, for CI."""
    shuffle = SHUFFLE_SEED if control else None
    if smoke:
        task = ModArithTask(p=7, ops=("+", "-"), train_frac=0.5, seed=SEED, shuffle_seed=shuffle)
        model = dict(hidden_size=16, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2)
        sched = dict(steps=steps or 20, eval_every=5, n_checkpoints=4, state_every=10)
    else:
        task = ModArithTask(p=31, ops=("+", "-"), train_frac=0.5, seed=SEED, shuffle_seed=shuffle)
        model = dict(hidden_size=48, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4)
        sched = dict(steps=steps or 1400, eval_every=25, early_every=5, n_checkpoints=22, state_every=100)
    model_config = dict(
        vocab_size=len(task.vocab),
        num_hidden_layers=6,
        num_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=AUX_LOSS_COEF,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **model,
    )
    return grok.RunSpec(
        name=f"{NAME}/{CONTROL_DIR}" if control else NAME,
        recipe=__name__,
        task=task,
        arch="olmoe",
        model_config=model_config,
        seed=SEED,
        lr=3e-3,
        weight_decay=2.0,
        betas=(0.9, 0.98),
        warmup=10,
        decay_frac=1.0,  # constant learning rate after the warm-up (see the module docstring)
        aux_loss_coef=AUX_LOSS_COEF,
        center_router=True,
        aux_loss_per_layer=True,
        grad_clip=1.0,
        checkpoint_dtype="float16",
        smoke=smoke,
        **sched,
    )


def train(
    out: Path,
    *,
    steps: int | None = None,
    smoke: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    series: Series = "both",
) -> dict:
    """Train (or resume) the main series into ``out`` and/or the control into ``out/control``;
    returns the card of the last series trained (or the interrupt record of an interrupted one)."""
    if series not in ("main", "control", "both"):
        raise ValueError(f"series must be 'main', 'control' or 'both', got {series!r}")
    out = Path(out)
    card: dict = {}
    for control in (False, True):
        if series == ("main", "control")[control] or series == "both":
            run = spec(steps=steps, smoke=smoke, control=control)
            folder = out / CONTROL_DIR if control else out
            card = grok.train(run, folder, progress=progress, stop_after=stop_after)
            if card.get("interrupted"):
                return card
            card = annotate(folder)
    return card


def evaluate(path: Path) -> dict:
    """Train/test accuracy and loss (overall and per operation) of a model or checkpoint folder."""
    return grok.evaluate(Path(path))


def annotate(folder: Path) -> dict:
    """Add the series, the checkpoint storage and the ``routing`` entry (:func:`routing_stats` of the
    final weights) to a trained folder's card; returns the card. Deterministic, so re-annotating changes nothing."""
    folder = Path(folder)
    card = json.loads((folder / "card.json").read_text())
    card["series"] = "control" if "shuffle_seed" in card["task"] else "main"
    card["checkpoint_storage"] = (f"checkpoints in {card['hyperparameters']['checkpoint_dtype']} safetensors; their "
                                  "config.json says float32, so loading restores float32")
    card["routing"] = routing_stats(folder)
    atomic.atomic_write_json(folder / "card.json", card, indent=2)
    folders.publish(folder / "card.json")
    return card


def routing_stats(path: Path) -> dict:
    """Routing of a trained folder (or checkpoint) on its training samples, from the routers' own
    outputs: ``expert_load[l][e]`` = share of the routed (token, slot) pairs of layer l that go to
    expert e, its minimum, and the number of distinct pathway strings at each τ in :data:`TAUS`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    root = next(d for d in (path, *list(path.resolve().parents)[:2]) if (d / "card.json").is_file())
    task = ModArithTask.from_dict(json.loads((root / "card.json").read_text())["task"])
    data = modarith.make_data(task, load_file(root / grok.SPLIT_FILE)["train"].bool())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = data.tokens[data.train]
    with torch.no_grad():
        logits = model(tokens, output_router_logits=True).router_logits  # per layer [N*T, E]
    k, n_experts = model.config.num_experts_per_tok, model.config.num_experts
    probs = [lg.float().softmax(-1) for lg in logits]
    load = [torch.bincount(p.topk(k, -1).indices.flatten(), minlength=n_experts) / (p.shape[0] * k) for p in probs]
    per_sample = [p.view(len(tokens), tokens.shape[1], -1).mean(1) for p in probs]  # token-averaged, [N, E]
    return {
        "on": "training samples, all prompt tokens, final weights",
        "expert_load": [[round(float(x), 4) for x in row] for row in load],
        "min_expert_load": round(float(min(row.min() for row in load)), 4),
        "distinct_pathways": {str(t): len(set(pathway_strings(per_sample, t))) for t in TAUS},
        "n_samples": len(tokens),
    }


def pathway_strings(per_sample: list[torch.Tensor], tau: float) -> list[str]:
    """METHODS §6 pathway strings from per-layer token-averaged router probabilities ([N, E] each):
    per layer the experts in descending weight up to the shortest prefix whose cumulative weight
    exceeds ``tau``, comma-separated; layers joined with "-"."""
    layers = []
    for g in per_sample:
        w, idx = g.sort(-1, descending=True)
        keep = (w.cumsum(-1) - w) <= tau  # an expert is kept while the weight before it is <= tau
        layers.append([",".join(str(int(e)) for e in row[m]) for row, m in zip(idx, keep)])
    return ["-".join(parts) for parts in zip(*layers)]
