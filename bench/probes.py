"""Logistic layer sweep: mechkit's batched solver vs a loop of scikit-learn fits on the same features.

Both sides get the same features, labels and split masks, fit L2 logistic regression (C=1) on
features standardised per training fold, and score the held-out rows; mechkit fits every (layer,
fold) problem in one batched optimisation, scikit-learn runs ``StandardScaler`` + ``LogisticRegression``
(lbfgs, its defaults) once per layer and fold. Rounds are interleaved and medians reported; the
per-layer accuracies of both are compared (they must agree within 1 point).

Cases: synthetic features (12 layers × 5,000 × 256, correlated and badly scaled, the class signal
growing with depth) with a 60/40 hold-out and with 5 folds, and, when the SmolLM2 weights are
installed, real features (all 30 ``resid_post`` layers of SmolLM2-135M on ``probes/city_truth_real``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/probes.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mechkit.probing.config import SweepConfig
from mechkit.probing.splits import split_masks
from mechkit.probing.sweep import fit_and_score

MAX_ITER = 1000  # lbfgs stops at 100 by default, short of the optimum on these problems; compare converged fits


def synthetic(layers: int = 12, n: int = 5000, d: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    spectrum = torch.logspace(0, -2, d).sqrt()[:, None]
    out = []
    for layer in range(layers):
        z = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) * spectrum)
        direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        z = z + (0.01 + 0.03 * layer) * (2 * y[:, None] - 1).float() * direction * z.std()
        z[:, :3] *= 20  # rogue dimensions, as residual streams have
        out.append(z)
    return torch.stack(out), y


def smollm_features() -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        import mechkit
        from mechkit.probing import features
        from mechkit.tasks import TaskSet

        model = mechkit.load("zoo:smollm2-135m")
    except Exception as err:
        print(f"(SmolLM2 case skipped: {err})")
        return None
    items = TaskSet.from_jsonl("probes/city_truth_real.jsonl")
    _, x = features.from_model(model, items.prompts, "blocks.*.resid_post", "last", batch_size=16)
    return x, torch.tensor(items.labels)


def sklearn_sweep(x: np.ndarray, y: np.ndarray, masks: np.ndarray) -> np.ndarray:
    acc = np.zeros((x.shape[0], masks.shape[0]))
    for layer in range(x.shape[0]):
        for f, train in enumerate(masks):
            scaler = StandardScaler().fit(x[layer][train])
            model = LogisticRegression(C=1.0, max_iter=MAX_ITER).fit(scaler.transform(x[layer][train]), y[train])
            acc[layer, f] = model.score(scaler.transform(x[layer][~train]), y[~train])
    return acc.mean(1)


def compare(name: str, x: torch.Tensor, y: torch.Tensor, split: float | int, rounds: int) -> None:
    masks = split_masks(y, split)
    cfg = SweepConfig(split=split, control=False)
    x64, y_np, m_np = x.double().numpy(), y.numpy(), masks.numpy()
    times: dict[str, list[float]] = {"mechkit": [], "sklearn": []}
    for _ in range(rounds):
        t = time.perf_counter()
        ours = fit_and_score(x, y, masks, 2, cfg, intervals=False)["accuracy"].numpy()
        times["mechkit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = sklearn_sweep(x64, y_np, m_np)
        times["sklearn"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    fits = x.shape[0] * masks.shape[0]
    print(f"\n{name}: {x.shape[0]} layers × {x.shape[1]} × {x.shape[2]}, split={split} ({fits} fits)")
    print(f"  scikit-learn loop   {med['sklearn'] * 1e3:8.1f} ms")
    print(f"  mechkit batched     {med['mechkit'] * 1e3:8.1f} ms   speed-up {med['sklearn'] / med['mechkit']:.1f}×")
    print(f"  accuracy, max |Δ| over layers: {np.abs(ours - theirs).max() * 100:.2f} pt "
          f"(mechkit {np.round(ours, 3).tolist()})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs's default 100 iterations, as users run it
    x, y = synthetic()
    compare("synthetic", x, y, 0.6, args.rounds)
    compare("synthetic", x, y, 5, args.rounds)
    real = smollm_features()
    if real is not None:
        compare("SmolLM2-135M city truth", *real, 5, args.rounds)


if __name__ == "__main__":
    main()
