"""The memorization → generalization monitor (METHODS §6): per checkpoint, the pathway distance and
smoothness of the memorized training samples next to training loss and test accuracy.

One forward pass per batch gives both the answer loss (teacher forced, mean NLL over the answer's
tokens) and the router logits; per-checkpoint tensors are kept per sample, so memorization is
decided after the last checkpoint and every metric is computed on the samples memorized by then.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.models.base import Model
from mechkit.models.load import load
from mechkit.moe import functional as F
from mechkit.moe.config import PathwayConfig
from mechkit.moe.memorization import auto_epsilon, generalized_at, memorized_since
from mechkit.moe.result import PathwayMonitorResult
from mechkit.moe.routers import router_weights
from mechkit.moe.samples import Encoded, encode, read_samples
from mechkit.provenance import provenance

__all__ = ["checkpoint_folders", "pathway_monitor"]


def checkpoint_folders(source: str | Path) -> tuple[list[Path], list[int]]:
    """The checkpoint folders and steps of a model folder with ``checkpoints/index.json`` (the zoo's layout)."""
    index = Path(source) / "checkpoints" / "index.json"
    if not index.is_file():
        raise MechkitError(f"{source} has no checkpoints/index.json; list the checkpoint folders instead")
    rows = json.loads(index.read_text())["checkpoints"]
    return [index.parent / r["path"] for r in rows], [int(r["step"]) for r in rows]


def pathway_monitor(checkpoints: Sequence[Any] | str | Path, train_samples: Any, test_samples: Any,
                    config: PathwayConfig | None = None, *, steps: Sequence[int] | None = None,
                    **options: Any) -> PathwayMonitorResult:
    """Run the monitor over ``checkpoints`` (model folders in training order, wrapped models, or one folder
    with ``checkpoints/index.json``). Samples are prompt/answer pairs in any form
    :func:`~mechkit.moe.samples.read_samples` takes. ``steps`` default to the index's, else the trailing
    number of each folder name, else 0, 1, …. Settings: :class:`PathwayConfig` (``config=`` or keywords)."""
    config = (config or PathwayConfig()).replace(**options) if options else (config or PathwayConfig())
    checkpoints, steps = _series(checkpoints, steps)
    train, test = read_samples(train_samples), read_samples(test_samples)
    from tqdm.auto import tqdm

    rows, first, encoded = [], None, None
    for source in tqdm(checkpoints, desc="checkpoints", disable=not config.progress, leave=False):
        model = source if isinstance(source, Model) else load(str(source), dtype=torch.float32)
        first = _same_architecture(first, model, source)
        if encoded is None:
            encoded = encode(model, train, "training sample"), encode(model, test, "test sample")
        rows.append(_measure(model, *encoded, config))
    return _summarise(rows, steps, config, provenance(model, [f"blocks.{i}.moe.router" for i in model.info.moe_layers]))


def _series(checkpoints: Any, steps: Sequence[int] | None) -> tuple[list[Any], list[int]]:
    if isinstance(checkpoints, (str, Path)):
        checkpoints, found = checkpoint_folders(checkpoints)
        steps = steps if steps is not None else found
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise MechkitError(f"a monitor needs at least two checkpoints, got {len(checkpoints)}")
    if steps is None:
        numbers = [re.search(r"(\d+)$", str(c)) if isinstance(c, (str, Path)) else None for c in checkpoints]
        steps = [int(m.group(1)) for m in numbers] if all(numbers) else list(range(len(checkpoints)))
    steps = [int(s) for s in steps]
    if len(steps) != len(checkpoints):
        raise MechkitError(f"{len(steps)} steps for {len(checkpoints)} checkpoints")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise MechkitError(f"steps {steps} are not increasing: give the checkpoints in training order")
    return checkpoints, steps


def _signature(model: Any) -> tuple:
    i = model.info
    return (type(model.torch_module).__name__, i.architecture, i.n_layers, i.d_model, i.n_experts, i.top_k,
            i.moe_layers, i.vocab_size)


def _same_architecture(first: tuple | None, model: Any, source: Any) -> tuple:
    sig = _signature(model)
    if not model.info.moe_layers:
        raise MechkitError(f"{source}: {model.info.name} has no MoE layers; the pathway monitor needs a "
                           "mixture-of-experts model")
    if first is not None and sig != first:
        raise MechkitError(f"checkpoint {source} is a different architecture ({sig}) from the first checkpoint "
                           f"({first}); give checkpoints of one training run")
    return sig


def _measure(model: Any, train: Encoded, test: Encoded, config: PathwayConfig) -> dict[str, Any]:
    """Per sample: loss, correctness and (training samples) token-averaged routing; the router weights."""
    loss, correct, routing = _forward(model, train, config, route=True)
    test_loss, test_correct, _ = _forward(model, test, config, route=False)
    weights = router_weights(model)
    embeddings = F.routing_embeddings(routing, weights, center=config.center_routers)
    smooth = (F.smoothness(F.layer_cosines(embeddings)) if len(routing) >= 3
              else torch.full((len(train),), float("nan"), dtype=torch.float64))
    return {"loss": loss, "correct": correct, "routing": routing, "smoothness": smooth,
            "test_loss": test_loss, "test_correct": test_correct}


def _forward(model: Any, data: Encoded, config: PathwayConfig, route: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    sites = [f"blocks.{i}.moe.router" for i in model.info.moe_layers] if route else []
    losses, correct, routing = [], [], [[] for _ in sites]
    for start in range(0, len(data), config.batch_size):
        ids, n_prompt = data.ids[start:start + config.batch_size], data.n_prompt[start:start + config.batch_size]
        logits, cache = model.run_with_cache(ids, sites) if sites else (model(ids), None)
        lengths = torch.tensor([len(r) for r in ids])
        width = logits.shape[1]
        pos = torch.arange(width)
        target = (pos[None] >= torch.tensor(n_prompt)[:, None]) & (pos[None] < lengths[:, None])  # answer tokens
        labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in ids], batch_first=True)
        pred = logits[:, :-1].float()  # position t predicts token t + 1
        nll = torch.nn.functional.cross_entropy(pred.transpose(1, 2), labels[:, 1:], reduction="none")
        answer = target[:, 1:]
        losses.append((nll * answer).sum(1).double() / answer.sum(1))
        correct.append(((pred.argmax(-1) == labels[:, 1:]) | ~answer).all(1))
        keep = (pos[None] < (torch.tensor(n_prompt) if config.routing_tokens == "prompt" else lengths)[:, None])
        for j, site in enumerate(sites):
            probs = cache[site].double().softmax(-1) * keep[..., None]
            routing[j].append(probs.sum(1) / keep.sum(1, keepdim=True))
    return torch.cat(losses), torch.cat(correct), [torch.cat(r) for r in routing]


def _summarise(rows: list[dict], steps: list[int], config: PathwayConfig, record: dict) -> PathwayMonitorResult:
    losses = torch.stack([r["loss"] for r in rows])
    epsilon = config.epsilon if config.epsilon is not None else auto_epsilon(losses, config.memorized_fraction)
    since = memorized_since(losses, epsilon, config.delta)
    n_tau, n_ckpt, n_layers = len(config.taus), len(rows), len(rows[0]["routing"])
    distance = torch.full((n_tau, n_ckpt), float("nan"), dtype=torch.float64)
    layer_distance = torch.full((n_tau, n_ckpt, n_layers), float("nan"), dtype=torch.float64)
    smooth = torch.full((n_ckpt,), float("nan"), dtype=torch.float64)
    group = torch.zeros(n_ckpt, dtype=torch.long)
    options = {"max_samples": config.max_samples, "seed": config.seed, "level": config.level}
    for c, row in enumerate(rows):
        members = (since >= 0) & (since <= c)
        group[c] = int(members.sum())
        if group[c] < config.min_group:
            continue
        routing = [g[members] for g in row["routing"]]
        for t, tau in enumerate(config.taus):
            distance[t, c] = F.mean_pathway_distance(F.pathway_strings(routing, tau), **options)
            layer_distance[t, c] = torch.tensor(F.layer_pathway_distances(routing, tau, **options))
        smooth[c] = row["smoothness"][members].mean()
    test_correct = torch.stack([r["test_correct"] for r in rows])
    step_of = torch.tensor([*steps, -1])  # index −1 ("never") maps to step −1
    return PathwayMonitorResult(
        steps=list(steps), taus=list(config.taus), distance=distance, layer_distance=layer_distance,
        smoothness=smooth, group_size=group, train_loss=losses.mean(1),
        train_accuracy=torch.stack([r["correct"] for r in rows]).double().mean(1),
        test_loss=torch.stack([r["test_loss"] for r in rows]).mean(1), test_accuracy=test_correct.double().mean(1),
        memorized_since=step_of[since], generalized_at=step_of[generalized_at(test_correct)],
        epsilon=float(epsilon), config=config.to_dict(), provenance=record)
