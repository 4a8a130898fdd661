"""Why the METHODS §6 smoothness of a zoo MoE grokking series moves the way it does.

Per checkpoint, over all training samples (token-averaged router probabilities ḡ, routers W_ℓ):

- ``c``: mean layer-pair cosine c_ℓ = cos(e_ℓ, e_ℓ+1), e_ℓ = ḡ_ℓ W_ℓ (the §6 quantity);
- ``c_ctr``: the same cosine after subtracting each layer's sample-mean embedding (what is left when the
  direction every sample shares is removed);
- ``share``: ‖mean_i e_i,ℓ‖ / mean_i ‖e_i,ℓ‖ per layer (1 = every sample has the same embedding);
- ``mu``: cos(e_i,ℓ, μ_ℓ) averaged over samples, μ_ℓ = mean router input (post-norm residual) of layer ℓ;
  ``mu_pair``: cos(μ_ℓ, μ_ℓ+1); ``mu_frac``: ‖μ_ℓ‖ / rms‖h‖ (how much of the router input is its mean);
- ``Wn``: ‖W_ℓ‖_F; ``Wmu``: ‖W_ℓ μ̂_ℓ‖ / ‖W_ℓ‖_F (share of the router that reads the mean direction);
- ``u_pair``: cos(u_ℓ, u_ℓ+1) of the mean expert rows u_ℓ = (1/K) Σ_k W_ℓ[k] (the row the softmax over
  experts cannot see: it gets no gradient, only Adam's per-coordinate steps and weight decay move it);
  ``e_u``: cos(e_i,ℓ, u_ℓ) averaged over samples; ``u_rel``: ‖u_ℓ‖ / mean_k ‖W_ℓ[k] − u_ℓ‖;
  ``gmax``: mean largest token-averaged router probability (1/K = uniform);
- ``sub``: mean cos of principal angles between the row spaces of W_ℓ and W_ℓ+1 (top-3 directions).

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_smoothness_diagnose.py FOLDER [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from moe_smoothness_eval import load_series
from transformers import AutoModelForCausalLM

from mechkit.moe import layer_cosines, routing_embeddings

KEYS = ("c", "u_pair", "e_u", "u_rel", "gmax", "c_ctr", "share", "mu", "mu_pair", "mu_frac", "Wn", "Wmu", "sub")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cosine_similarity(a, b, dim=-1)


def _router_inputs(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    inputs: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for layer in model.model.layers]
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    for h in hooks:
        h.remove()
    return inputs, out.router_logits


def diagnose(folder: Path, data) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = data.tokens[data.train]
    n, t = tokens.shape
    inputs, logits = _router_inputs(model, tokens)
    gates = [layer.mlp.gate.weight.detach().double() for layer in model.model.layers]
    probs = [lg.float().softmax(-1).view(n, t, -1).mean(1) for lg in logits]
    emb = routing_embeddings(probs, gates)
    ctr = [e - e.mean(0) for e in emb]
    mus = [h.double().mean(0) for h in inputs]
    sub = []
    for a, b in itertools.pairwise(gates):
        qa, qb = torch.linalg.svd(a, full_matrices=False)[2][:3], torch.linalg.svd(b, full_matrices=False)[2][:3]
        sub.append(float(torch.linalg.svdvals(qa @ qb.T).mean()))
    r = lambda xs: [round(float(x), 3) for x in xs]  # noqa: E731
    return {
        "step": int(folder.name.split("-")[1]),
        "c": r(layer_cosines(emb).mean(0)),
        "c_ctr": r(layer_cosines(ctr).mean(0)),
        "share": r(e.mean(0).norm() / e.norm(dim=-1).mean() for e in emb),
        "mu": r(_cos(e, m[None]).mean() for e, m in zip(emb, mus)),
        "mu_pair": r(_cos(a, b) for a, b in itertools.pairwise(mus)),
        "mu_frac": r(m.norm() / h.double().norm(dim=-1).pow(2).mean().sqrt() for m, h in zip(mus, inputs)),
        "Wn": r(w.norm() for w in gates),
        "Wmu": r((w @ (m / m.norm())).norm() / w.norm() for w, m in zip(gates, mus)),
        "sub": r(sub),
        "u_pair": r(_cos(a.mean(0), b.mean(0)) for a, b in itertools.pairwise(gates)),
        "e_u": r(_cos(e, w.mean(0)[None]).mean() for e, w in zip(emb, gates)),
        "u_rel": r(w.mean(0).norm() / (w - w.mean(0)).norm(dim=-1).mean() for w in gates),
        "gmax": r(p.max(-1).values.mean() for p in probs),
    }


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    for name, root in (("main", args.folder), ("control", args.folder / "control")):
        if not (root / "card.json").is_file():
            continue
        data, ckpts = load_series(root)
        index = {c["step"]: c for c in json.loads((root / "checkpoints" / "index.json").read_text())["checkpoints"]}
        rows = [diagnose(c, data) for c in ckpts]
        print(f"== {name}")
        for row in rows:
            acc = index[row["step"]]
            print(f"step {row['step']:5d} train {acc['train_acc']:.3f} test {acc['test_acc']:.3f}")
            for key in KEYS:
                print(f"    {key:8s} {row[key]}")
        results[name] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
