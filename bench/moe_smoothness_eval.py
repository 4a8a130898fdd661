"""METHODS §6 monitor of a zoo MoE grokking folder and its control, as numbers to compare recipe variants.

Same formulas as ``bench/moe_pathways_check.py`` (fixed ε = 0.1 nats, δ = 0.05, 300 samples per
distance, τ ∈ {0.5, 0.7, 0.8}); adds Spearman of everything, the per-checkpoint table and a JSON dump.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_smoothness_eval.py FOLDER [--json OUT.json]

FOLDER holds the main series and FOLDER/control the control (skipped if absent). ``--center-routers``
(a diagnostic, not the shipped weights): subtract each router's mean expert row before the formula. The
softmax over experts cannot see that row, so this is the same model in another gauge of W_ℓ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForCausalLM

from mechkit.moe import layer_cosines, mean_pathway_distance, pathway_strings, routing_embeddings, smoothness
from mechkit.tasks import modarith
from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import grok

EPS, DELTA, SAMPLE, TAUS, MIN_GROUP = 0.1, 0.05, 300, (0.5, 0.7, 0.8), 20


def load_series(root: Path):
    task = ModArithTask.from_dict(json.loads((root / "card.json").read_text())["task"])
    data = modarith.make_data(task, load_file(root / grok.SPLIT_FILE)["train"].bool())
    return data, sorted(p for p in (root / "checkpoints").iterdir() if p.is_dir())


def measure(folder: Path, data, center: bool = False) -> dict:
    """Per-sample loss/accuracy, token-averaged router probabilities, router weights, layer cosines."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(data.tokens, output_router_logits=True)
        gates = [model.model.layers[i].mlp.gate.weight.float().clone() for i in range(model.config.num_hidden_layers)]
    logits = out.logits[:, -1]
    n, t = data.tokens.shape
    probs = [lg.float().softmax(-1).view(n, t, -1).mean(1) for lg in out.router_logits]
    cos = layer_cosines(routing_embeddings(probs, [w - w.mean(0) for w in gates] if center else gates))
    return {"step": int(folder.name.split("-")[1]), "model": model, "gates": gates,
            "loss": torch.nn.functional.cross_entropy(logits, data.labels, reduction="none"),
            "acc": (logits.argmax(-1) == data.labels).float(), "probs": probs, "cos": cos,
            "smooth": smoothness(cos)}


def memorized_mask(rows: list[dict], train: torch.Tensor) -> torch.Tensor:
    """[checkpoints, n_train]: sample memorized at this checkpoint and at every later one (§6, fixed ε)."""
    losses = torch.stack([r["loss"][train] for r in rows])
    ok = (losses <= EPS) & ((losses - losses[-1]).abs() <= DELTA)
    return torch.flip(torch.cumprod(torch.flip(ok.int(), [0]), 0), [0]).bool()


def monitor(rows: list[dict], data) -> dict:
    train, test = data.train, ~data.train
    memorized = memorized_mask(rows, train)
    out: dict = {"table": [], "corr": {}}
    for r, mem in zip(rows, memorized):
        if mem.sum() < MIN_GROUP:
            continue
        rec = {"step": r["step"], "n_memorized": int(mem.sum()), "test_acc": float(r["acc"][test].mean()),
               "train_loss": float(r["loss"][train].mean()),
               "smoothness": float(r["smooth"][train][mem].mean()),
               "small_max_share": float(((top := r["cos"][train][mem].max(-1).values) > 0).logical_and(top < 0.05)
                                        .float().mean()),
               "layer_cos": [round(float(x), 4) for x in r["cos"][train][mem].mean(0)]}
        for tau in TAUS:
            strings = pathway_strings([p[train][mem] for p in r["probs"]], tau)
            rec[f"distance@{tau}"] = mean_pathway_distance(strings, max_samples=SAMPLE)
        out["table"].append(rec)
    acc = [x["test_acc"] for x in out["table"]]
    keys = [f"distance@{t}" for t in TAUS] + ["smoothness", "train_loss"]
    for key in keys:
        v = [x[key] for x in out["table"]]
        out["corr"][key] = {"pearson": float(pearsonr(v, acc)[0]), "spearman": float(spearmanr(v, acc)[0])}
    for pair in range(len(out["table"][0]["layer_cos"])):
        v = [x["layer_cos"][pair] for x in out["table"]]
        out["corr"][f"cos_pair{pair}"] = {"pearson": float(pearsonr(v, acc)[0]),
                                          "spearman": float(spearmanr(v, acc)[0])}
    return out


def evaluate_folder(root: Path, center: bool = False) -> dict:
    data, ckpts = load_series(root)
    return monitor([measure(c, data, center) for c in ckpts], data)


def report(name: str, res: dict) -> None:
    t = res["table"]
    print(f"== {name}: {len(t)} checkpoints after memorization (steps {t[0]['step']}-{t[-1]['step']})")
    for key, c in res["corr"].items():
        print(f"   {key:14s} r {c['pearson']:+.2f}  rho {c['spearman']:+.2f}")
    for x in t:
        print(f"   step {x['step']:5d} acc {x['test_acc']:.3f} dist@.7 {x['distance@0.7']:.2f} "
              f"S {x['smoothness']:.3f} (max c<.05: {x['small_max_share']:.3f}) cos {x['layer_cos']} "
              f"mem {x['n_memorized']}")


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--center-routers", action="store_true")
    args = ap.parse_args()
    results = {"main": evaluate_folder(args.folder, args.center_routers)}
    if (args.folder / "control" / "card.json").is_file():
        results["control"] = evaluate_folder(args.folder / "control", args.center_routers)
    for name, res in results.items():
        report(name, res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
