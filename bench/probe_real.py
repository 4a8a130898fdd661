"""Layer curves and concept depths of linear probes on the offline real weights.

SmolLM2-135M (30 layers): true/false city statements and entity categories (person / city /
country), last token; MiniLM-L6 (a BERT encoder, 6 layers): hand-written sentence polarity, mean over
real tokens. Group folds throughout (items come in pairs or repeat an entity). Prints one line per
concept: accuracy by layer, the concept depth and the control-task selectivity at the best layer.

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_real.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import mechkit
from mechkit.probing import probe_sweep

CASES = [
    ("zoo:smollm2-135m", "probes/city_truth_real.jsonl", "last", "city"),
    ("zoo:smollm2-135m", "probes/entity_category_real.jsonl", "last", "group"),
    ("zoo:minilm-l6", "probes/polarity_real.jsonl", "mean", "group"),
]


def main() -> None:
    torch.set_num_threads(1)
    models: dict[str, object] = {}
    for name, path, position, groups in CASES:
        model = models.setdefault(name, mechkit.load(name))
        start = time.perf_counter()
        result = probe_sweep(model, path, sites="embed,blocks.*.resid_post", position=position, groups=groups,
                             split=5, batch_size=16, progress=False)
        depth = result.concept_depth()
        best = int(result.accuracy.argmax())
        print(f"\n{name} · {path} · position={position} · groups={groups} ({time.perf_counter() - start:.1f} s)")
        print("  accuracy by site:", " ".join(f"{a:.2f}" for a in result.accuracy.tolist()))
        print(f"  chance {result.chance:.2f}; best {result.sites[best]} {result.accuracy[best]:.3f} "
              f"[{result.ci_low[best]:.3f}, {result.ci_high[best]:.3f}], AUROC {result.auroc[best]:.3f}, "
              f"selectivity {result.selectivity[best]:.3f}")
        print(f"  concept depth: jump {depth.jump}, converging {depth.converging:.2f}, peak {depth.peak:.2f}")


if __name__ == "__main__":
    main()
