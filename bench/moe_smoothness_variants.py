"""Train recipe variants of ``moe-grok-deep`` (main series and, with ``--control``, the label-shuffled
control) into a scratch folder, for comparing the METHODS §6 monitor (``bench/moe_smoothness_eval.py``).

Each variant is the shipped spec (``moe_grok_deep.spec``) with a few fields replaced::

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_smoothness_variants.py VARIANT [--series main|control|both]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from mechkit.zoo.recipes import grok, moe_grok_deep

VARIANTS = {
    "shipped": {},
    "center": {"center_router": True},
    "router_wd0": {"router_weight_decay": 0.0},
    "center_router_wd0": {"center_router": True, "router_weight_decay": 0.0},
    "center_router_wd0_aux05": {"center_router": True, "router_weight_decay": 0.0, "aux_loss_coef": 0.05},
    "center_router_wd0.5": {"center_router": True, "router_weight_decay": 0.5},
    "router_wd0.5": {"router_weight_decay": 0.5},
    "center_aux005": {"center_router": True, "aux_loss_coef": 0.005},
    "center_h64": {"center_router": True, "model_config": {"hidden_size": 64}},
    "center_constlr": {"center_router": True, "decay_frac": 1.0},
    "constlr": {"decay_frac": 1.0},
    "center_decay90": {"center_router": True, "decay_frac": 0.9},
    "zloss": {"router_z_loss_coef": 0.001},
    "zloss_constlr": {"router_z_loss_coef": 0.001, "decay_frac": 1.0},
}


def variant_spec(name: str, control: bool) -> grok.RunSpec:
    base = moe_grok_deep.spec(control=control)
    fields = dict(VARIANTS[name])
    if "model_config" in fields:
        fields["model_config"] = {**base.model_config, **fields["model_config"]}
    if "aux_loss_coef" in fields:
        base = dataclasses.replace(base, model_config={**base.model_config,
                                                       "router_aux_loss_coef": fields["aux_loss_coef"]})
    return dataclasses.replace(base, name=f"{base.name}:{name}", extra={"variant": name, **VARIANTS[name]}, **fields)


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("--series", choices=("main", "control", "both"), default="main")
    ap.add_argument("--out", type=Path, default=Path("/tmp/moe_variants"))
    args = ap.parse_args()
    root = args.out / args.variant
    for control in {"main": (False,), "control": (True,), "both": (False, True)}[args.series]:
        folder = root / moe_grok_deep.CONTROL_DIR if control else root
        t0 = time.time()
        grok.train(variant_spec(args.variant, control), folder, progress=False)
        card = moe_grok_deep.annotate(folder)
        m = card["metrics"]
        print(json.dumps({"folder": str(folder), "wall_s": round(time.time() - t0), "train_acc": m["train_acc"],
                          "test_acc": m["test_acc"], "step_train_99": m["step_train_99"],
                          "step_test_95": m["step_test_95"], "min_expert_load": card["routing"]["min_expert_load"],
                          "distinct_pathways": card["routing"]["distinct_pathways"]}), flush=True)


if __name__ == "__main__":
    main()
