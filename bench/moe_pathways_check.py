"""METHODS §6 pathway metrics over a zoo MoE checkpoint series, ahead of the mechkit.moe package.

Per checkpoint after memorization (fixed ε = 0.1 nats, δ = 0.05; a sample counts once it stays
memorized to the end): the mean Levenshtein pathway distance over memorized training samples (300
drawn with seed 0), their mean smoothness, the training loss and the test accuracy; Pearson and
Spearman of each with test accuracy at τ ∈ {0.5, 0.7, 0.8}.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_pathways_check.py assets/zoo/moe-grok-deep[/control]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForCausalLM

from mechkit.moe import layer_cosines, mean_pathway_distance, pathway_strings, routing_embeddings, smoothness
from mechkit.tasks import modarith
from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import grok

EPS, DELTA, SAMPLE = 0.1, 0.05, 300


def measure(folder: Path, data) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(data.tokens, output_router_logits=True)
        gates = [model.model.layers[i].mlp.gate.weight.float() for i in range(model.config.num_hidden_layers)]
    logits = out.logits[:, -1]
    n, t = data.tokens.shape
    probs = [lg.float().softmax(-1).view(n, t, -1).mean(1) for lg in out.router_logits]  # token-averaged
    cos = layer_cosines(routing_embeddings(probs, gates))
    return {"step": int(folder.name.split("-")[1]),
            "loss": torch.nn.functional.cross_entropy(logits, data.labels, reduction="none"),
            "acc": (logits.argmax(-1) == data.labels).float(), "probs": probs,
            "smooth": smoothness(cos)}


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    task = ModArithTask.from_dict(json.loads((root / "card.json").read_text())["task"])
    data = modarith.make_data(task, load_file(root / grok.SPLIT_FILE)["train"].bool())
    train, test = data.train, ~data.train
    rows = [measure(c, data) for c in sorted(p for p in (root / "checkpoints").iterdir() if p.is_dir())]
    losses = torch.stack([r["loss"][train] for r in rows])
    ok = (losses <= EPS) & ((losses - losses[-1]).abs() <= DELTA)
    memorized = torch.flip(torch.cumprod(torch.flip(ok.int(), [0]), 0), [0]).bool()  # ok from here to the end
    for tau in (0.5, 0.7, 0.8):
        table = []
        for r, mem in zip(rows, memorized):
            if mem.sum() < 20:
                continue
            strings = pathway_strings([p[train][mem] for p in r["probs"]], tau)
            distance = mean_pathway_distance(strings, max_samples=SAMPLE)
            table.append((r["step"], distance, float(r["smooth"][train][mem].mean()),
                          float(r["loss"][train].mean()), float(r["acc"][test].mean()), int(mem.sum())))
        _, dist, smooth, loss, acc, _ = zip(*table)
        print(f"τ {tau}: {len(table)} checkpoints after memorization; distance r {pearsonr(dist, acc)[0]:+.2f} "
              f"ρ {spearmanr(dist, acc)[0]:+.2f} | smoothness r {pearsonr(smooth, acc)[0]:+.2f} "
              f"ρ {spearmanr(smooth, acc)[0]:+.2f} | train loss r {pearsonr(loss, acc)[0]:+.2f}")
        if tau == 0.7:
            for step, d, s, lo, a, m in table:
                print(f"   step {step:5d} distance {d:.2f} smoothness {s:.3f} train loss {lo:.3f} test acc {a:.3f} "
                      f"memorized {m}")


if __name__ == "__main__":
    main()
