"""METHODS §6 pathway metrics over a zoo MoE checkpoint series, through ``mechkit.moe.pathway_monitor``.

Per checkpoint after memorization (fixed ε = 0.1 nats, δ = 0.05; a sample counts once it stays
memorized to the end): the mean Levenshtein pathway distance over memorized training samples (300
drawn with seed 0), their mean smoothness, the training loss and the test accuracy; Pearson and
Spearman of each with test accuracy at τ ∈ {0.5, 0.7, 0.8}.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_pathways_check.py assets/zoo/moe-grok-deep[/control]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mechkit.moe import PathwayConfig, pathway_monitor, split_samples


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    train, test = split_samples(root)
    start = time.perf_counter()
    result = pathway_monitor(root, train, test, PathwayConfig(progress=False))
    print(f"{root}: {len(result.steps)} checkpoints in {time.perf_counter() - start:.1f} s")
    table = result.correlations().set_index("metric")
    smooth, loss = table.loc["smoothness"], table.loc["train loss"]
    for tau in result.taus:
        dist = table.loc[f"distance (tau {tau})"]
        print(f"τ {tau}: {int(dist.checkpoints)} checkpoints after memorization; distance r {dist.pearson:+.2f} "
              f"ρ {dist.spearman:+.2f} | smoothness r {smooth.pearson:+.2f} ρ {smooth.spearman:+.2f} | "
              f"train loss r {loss.pearson:+.2f}")
    frame = result.to_frame().query("tau == 0.7 and group_size >= 20")
    for row in frame.itertuples():
        print(f"   step {row.step:5d} distance {row.distance:.2f} smoothness {row.smoothness:.3f} train loss "
              f"{row.train_loss:.3f} test acc {row.test_accuracy:.3f} memorized {row.group_size}")


if __name__ == "__main__":
    main()
