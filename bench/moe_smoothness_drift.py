"""Where the mean expert row u_ℓ = (1/K) Σ_k W_ℓ[k] of each router comes from: replay the first steps of the
``moe-grok-deep`` recipe (same model, data, loss, AdamW, clipping) and record, per step and MoE layer, the
row-mean of the router gradient (zero: the softmax over experts cannot see u) and of AdamW's actual step,
and the cosine between adjacent layers' u-steps and between their accumulated u.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_smoothness_drift.py [STEPS]
"""

from __future__ import annotations

import itertools
import sys

import torch

from mechkit.tasks import modarith
from mechkit.zoo.recipes import grok, moe_grok_deep


def main() -> None:
    torch.set_num_threads(1)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    spec = moe_grok_deep.spec()
    torch.manual_seed(spec.seed)
    model = grok.build_model(spec).train()
    opt = grok.make_optimizer(spec, model)
    routers = grok.router_weights(model)
    data = modarith.make_data(spec.task)
    x, y = data.tokens[data.train], data.labels[data.train]
    cos = lambda a, b: float(torch.cosine_similarity(a, b, dim=0))  # noqa: E731
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = grok.lr_at(spec, step)
        res = model(x, logits_to_keep=1, output_router_logits=True)
        loss = torch.nn.functional.cross_entropy(res.logits[:, -1], y)
        loss = loss + spec.aux_loss_coef * grok.per_layer_balance_loss(res.router_logits, spec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        before = [w.detach().clone() for w in routers]
        grad_mean = [float(w.grad.mean(0).norm() / w.grad.norm()) for w in routers]
        opt.step()
        du = [(w.detach() - b).mean(0) for w, b in zip(routers, before)]
        rel = [float(d.norm() / (w.detach() - b).norm()) for d, w, b in zip(du, routers, before)]
        if step % 25 == 0:
            u = [w.detach().mean(0) for w in routers]
            du_pair = [round(cos(a, b), 2) for a, b in itertools.pairwise(du)]
            u_pair = [round(cos(a, b), 2) for a, b in itertools.pairwise(u)]
            print(f"step {step:4d} |mean grad row|/|grad| {max(grad_mean):.1e}  |mean step row|/|step| "
                  f"{[round(r, 2) for r in rel]}  cos(du_l,du_l+1) {du_pair}  cos(u_l,u_l+1) {u_pair}", flush=True)


if __name__ == "__main__":
    main()
