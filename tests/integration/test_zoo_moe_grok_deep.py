"""``moe-grok-deep``: both shipped checkpoint series (main and label-shuffled control) re-measured
against their index and card, offline loading, top-k routing through every backend against the
routers' own choice, the expert-load and distinct-pathway conditions at the final checkpoint, and the
pathway monitor's trends (main series) and their absence (control).
Retraining from scratch is a benchmark (bench/zoo_moe_grok_deep.py), not a test."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mechkit
from mechkit.errors import SiteNotSupportedError
from mechkit.models.load import BACKENDS
from mechkit.tasks import modarith
from mechkit.zoo import registry
from mechkit.zoo.recipes import moe_grok_deep

NAME = "moe-grok-deep"
TOL = 2e-3  # accuracy: about one example in ~500
TAU = 0.7
MIN_LOAD = 0.03
MIN_PATHWAYS = 200


@pytest.fixture(scope="module")
def root() -> Path:
    return registry.resolve(NAME)


def _series(root: Path) -> dict[str, Path]:
    return {"main": root, "control": root / moe_grok_deep.CONTROL_DIR}


def _read(folder: Path) -> tuple[dict, dict]:
    card = json.loads((folder / "card.json").read_text())
    return card, json.loads((folder / "checkpoints" / "index.json").read_text())


def _train_tokens(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    task = modarith.ModArithTask.from_dict(_read(folder)[0]["task"])
    data = modarith.make_data(task, load_file(folder / "split.safetensors")["train"].bool())
    return data.tokens[data.train]


@pytest.mark.parametrize("series", ["main", "control"])
def test_cards_and_indexes_describe_the_shipped_series(root: Path, series: str) -> None:
    folder = _series(root)[series]
    card, index = _read(folder)
    assert card["recipe"] == registry.get(NAME).recipe and card["smoke"] is False
    cfg = card["model_config"]
    assert card["architecture"] == "OlmoeForCausalLM"
    assert cfg["num_hidden_layers"] >= 6 and cfg["num_experts"] >= 8 and cfg["num_experts_per_tok"] == 2
    assert len(card["task"]["ops"]) >= 2
    assert ("shuffle_seed" in card["task"]) == (series == "control")
    assert card["hyperparameters"]["aux_loss_coef"] > 0 and card["wall_time_s"] > 0
    steps = [c["step"] for c in index["checkpoints"]]
    assert len(steps) >= 20 and steps == sorted(steps) and steps[0] == 0 and steps[-1] == card["training_steps"]
    assert sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step-*")) == steps
    with safe_open(str(folder / "checkpoints" / index["checkpoints"][-1]["path"] / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    assert (folder / "split.safetensors").is_file()


def test_both_series_fit_the_budget(root: Path) -> None:
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total <= 30e6, f"moe-grok-deep takes {total / 1e6:.1f} MB"


@pytest.mark.parametrize("series", ["main", "control"])
def test_every_checkpoint_re_measures_like_its_index_and_card(root: Path, series: str) -> None:
    folder = _series(root)[series]
    card, index = _read(folder)
    measured = {}
    for c in index["checkpoints"]:
        got = moe_grok_deep.evaluate(folder / "checkpoints" / c["path"])
        for key in ("train_acc", "test_acc", "train_loss"):
            assert got[key] == pytest.approx(c[key], abs=TOL), (c["path"], key)
        measured[c["step"]] = got
    final = moe_grok_deep.evaluate(folder)
    for key, value in final.items():
        assert value == pytest.approx(card["metrics"][key], abs=TOL), key
    steps = sorted(measured)
    assert final["train_acc"] >= 0.99, "the series does not memorise its training set"
    if series == "main":
        s1, s2 = card["metrics"]["step_train_99"], card["metrics"]["step_test_95"]
        assert measured[s1]["train_acc"] >= 0.99 and measured[s2]["test_acc"] >= 0.95
        assert all(measured[s]["train_acc"] < 0.99 for s in steps if s < s1)
        assert all(measured[s]["test_acc"] < 0.95 for s in steps if s < s2)
        assert s2 >= 10 * s1 and measured[s1]["test_acc"] < 0.5  # memorised first, generalised much later
        # constant learning rate: after grokking test accuracy wobbles a few points below its peak
        assert final["test_acc"] >= 0.9 and min(m["test_acc"] for s, m in measured.items() if s >= s2) >= 0.85
    else:  # the control never generalises: test accuracy stays near chance (1/p)
        chance = 1 / card["task"]["p"]
        assert max(m["test_acc"] for m in measured.values()) < chance + 0.05
        assert card["metrics"]["step_test_95"] is None


def test_loads_offline_by_zoo_name(root: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = mechkit.load(f"zoo:{NAME}")
    assert model.info.n_experts >= 8 and model.info.top_k == 2 and len(model.info.moe_layers) >= 6
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}  # fp16 on disk, fp32 in memory
    tokens = _train_tokens(root)[:8]
    run = model.run_with_cache(tokens, "blocks.0.moe.router")
    vocab = modarith.ModArithTask.from_dict(_read(root)[0]["task"]).vocab
    assert run.logits.dtype == torch.float32 and run.logits.shape[-1] == len(vocab)


def _own_choice(hf, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The experts each router module itself returned (its top-k indices), per MoE layer, [N*T, k] sorted."""
    chosen: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(o[2].sort(-1).values))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in hooks:
            h.remove()
    return chosen


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_routing_through_every_backend_is_the_models_own_choice(root: Path, backend: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = root / "checkpoints" / _read(root)[1]["checkpoints"][-1]["path"]
    tokens = _train_tokens(root)[:96]
    want = _own_choice(AutoModelForCausalLM.from_pretrained(folder).eval(), tokens)
    model = mechkit.load(str(folder), backend=backend)
    k = model.info.top_k
    layers = model.info.moe_layers
    assert len(layers) == len(want)
    if backend == "lens":  # TransformerLens has no top-k hook: the router logits are read, top-k taken
        with pytest.raises(SiteNotSupportedError):
            model.run_with_cache(tokens, "blocks.0.moe.topk")
        _, cache = model.run_with_cache(tokens, "blocks.*.moe.router")
        got = [cache[f"blocks.{ly}.moe.router"].softmax(-1).topk(k, -1).indices for ly in layers]
    else:
        _, cache = model.run_with_cache(tokens, "blocks.*.moe.topk")
        dense = [cache[f"blocks.{ly}.moe.topk"] for ly in layers]
        assert all(((d > 0).sum(-1) == k).all() for d in dense)
        got = [d.topk(k, -1).indices for d in dense]
    for layer, g, w in zip(layers, got, want):
        assert torch.equal(g.reshape(-1, k).sort(-1).values, w), f"layer {layer}"


def _pathways(probs: list[torch.Tensor], tau: float) -> list[str]:
    """METHODS §6 by hand: per sample and layer, experts by descending token-averaged weight until
    the running sum exceeds tau."""
    out = []
    for i in range(probs[0].shape[0]):
        parts = []
        for g in probs:
            weights = g[i].tolist()
            order = sorted(range(len(weights)), key=lambda e: -weights[e])
            kept, total = [], 0.0
            for e in order:
                kept.append(str(e))
                total += weights[e]
                if total > tau:
                    break
            parts.append(",".join(kept))
        out.append("-".join(parts))
    return out


@pytest.mark.parametrize("where", ["final", "last checkpoint"])
def test_routing_is_balanced_and_diverse_at_the_end(root: Path, where: str) -> None:
    card, index = _read(root)
    folder = root if where == "final" else root / "checkpoints" / index["checkpoints"][-1]["path"]
    tokens = _train_tokens(root)
    model = mechkit.load(str(folder))
    _, cache = model.run_with_cache(tokens, ["blocks.*.moe.router", "blocks.*.moe.topk"])
    layers = model.info.moe_layers
    loads = []
    for ly in layers:
        routed = (cache[f"blocks.{ly}.moe.topk"] > 0).flatten(0, 1).float()  # [N*T, E]
        loads.append(routed.sum(0) / routed.sum())
    for ly, load in zip(layers, loads):
        assert load.min() >= MIN_LOAD, f"layer {ly}: an expert receives {load.min():.3f} of the routed tokens"
    probs = [cache[f"blocks.{ly}.moe.router"].softmax(-1).mean(1) for ly in layers]  # token-averaged [N, E]
    distinct = len(set(_pathways(probs, TAU)))
    assert distinct >= MIN_PATHWAYS
    if where == "final":  # the card's table and count are what the shipped weights give
        torch.testing.assert_close(torch.stack(loads), torch.tensor(card["routing"]["expert_load"]),
                                   atol=1e-3, rtol=0)
        assert card["routing"]["distinct_pathways"][str(TAU)] == distinct


def test_control_labels_are_a_permutation_of_the_true_training_labels(root: Path) -> None:
    card = _read(root / moe_grok_deep.CONTROL_DIR)[0]
    shuffled = modarith.ModArithTask.from_dict(card["task"])
    true = modarith.ModArithTask.from_dict({k: v for k, v in card["task"].items() if k != "shuffle_seed"})
    a, b = modarith.make_data(true), modarith.make_data(shuffled)
    assert torch.equal(a.train, b.train) and torch.equal(a.labels[~a.train], b.labels[~b.train])
    assert torch.equal(a.labels[a.train].sort().values, b.labels[b.train].sort().values)
    assert (a.labels[a.train] != b.labels[b.train]).float().mean() > 0.8  # chance of a fixed point: 1/p


def test_per_layer_balance_loss_is_the_transformers_loss_of_each_layer() -> None:
    """The recipe balances every layer on its own: per layer it is transformers' Switch loss of that
    layer alone, and the mean over layers differs from the pooled loss when one layer is unbalanced."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    from mechkit.zoo.recipes import grok

    spec = moe_grok_deep.spec(smoke=True)
    e, k = spec.model_config["num_experts"], spec.model_config["num_experts_per_tok"]
    gen = torch.Generator().manual_seed(0)
    layers = (torch.randn(40, e, generator=gen), torch.randn(40, e, generator=gen) + 4 * torch.eye(e)[0])
    per_layer = [load_balancing_loss_func((lg,), e, k) for lg in layers]
    got = grok.per_layer_balance_loss(layers, spec)
    torch.testing.assert_close(got, torch.stack(per_layer).mean())
    assert not torch.isclose(got, load_balancing_loss_func(layers, e, k))


def test_router_options_keep_the_function_and_the_shipped_spec(tmp_path: Path) -> None:
    """``center_router`` removes each router's mean expert row without changing any output (the softmax
    over experts cannot see it) and keeps it removed through training; ``router_weight_decay`` gives the
    routers, and only them, their own decay; the shipped spec centres its routers and leaves their decay alone."""
    import dataclasses

    from mechkit.zoo.recipes import grok

    base = moe_grok_deep.spec(smoke=True)
    assert base.to_dict()["center_router"] is True and "router_weight_decay" not in base.to_dict()
    torch.manual_seed(0)
    model = grok.build_model(base).eval()
    routers = grok.router_weights(model)
    assert len(routers) == base.model_config["num_hidden_layers"]
    with torch.no_grad():
        for w in routers:
            w.add_(torch.randn(w.shape[1]))  # a large mean row
    x = modarith.make_data(base.task).tokens[:8]
    with torch.no_grad():
        before = model(x, output_router_logits=True)
        grok.center_routers(model)
        after = model(x, output_router_logits=True)
    torch.testing.assert_close(after.logits, before.logits)
    for a, b in zip(after.router_logits, before.router_logits):
        torch.testing.assert_close(a.softmax(-1), b.softmax(-1))
    assert max(float(w.detach().mean(0).abs().max()) for w in routers) < 1e-6

    spec = dataclasses.replace(base, center_router=True, router_weight_decay=0.0)
    groups = grok.make_optimizer(spec, model).param_groups
    assert [g["weight_decay"] for g in groups] == [base.weight_decay, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in routers}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    grok.train(spec, tmp_path / "run", progress=False)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    assert max(float(w.detach().mean(0).abs().max()) for w in grok.router_weights(trained)) < 1e-6


@pytest.mark.parametrize("series", ["main", "control"])
def test_shipped_routers_have_no_mean_expert_row(root: Path, series: str) -> None:
    """Both series trained with ``center_router``: the final fp32 routers' mean expert rows are zero, so the
    routing embeddings of METHODS §6 read only what the softmax over experts sees."""
    from transformers import AutoModelForCausalLM

    from mechkit.zoo.recipes import grok

    folder = _series(root)[series]
    assert _read(folder)[0]["hyperparameters"]["center_router"] is True
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    routers = [w.detach() for w in grok.router_weights(model)]
    assert max(float(w.mean(0).abs().max()) for w in routers) < 1e-6 < min(float(w.abs().max()) for w in routers)


def test_router_z_loss_sees_the_logit_every_expert_shares(tmp_path: Path) -> None:
    """``router_z_loss`` is the mean over layers of mean_t logsumexp(z_t)²; a logit added to every expert
    changes it (the balancing loss cannot see that shift); off by default (absent from the spec), and when
    on it moves the routers' mean expert row that training without it leaves to AdamW's drift."""
    import dataclasses

    from mechkit.zoo.recipes import grok

    spec = moe_grok_deep.spec(smoke=True)
    gen = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(40, 8, generator=gen) for _ in range(3))
    want = torch.stack([torch.stack([row.logsumexp(0) ** 2 for row in lg]).mean() for lg in layers]).mean()
    torch.testing.assert_close(grok.router_z_loss(layers), want)
    shifted = tuple(lg + 3.0 for lg in layers)
    assert grok.router_z_loss(shifted) > grok.router_z_loss(layers) + 1.0
    e = spec.model_config["num_experts"]
    smoke_layers = tuple(lg[:, :e] for lg in layers)
    torch.testing.assert_close(grok.per_layer_balance_loss(tuple(lg + 3.0 for lg in smoke_layers), spec),
                               grok.per_layer_balance_loss(smoke_layers, spec))
    assert "router_z_loss_coef" not in spec.to_dict()

    def mean_rows(coef: float) -> list[torch.Tensor]:
        run = dataclasses.replace(spec, router_z_loss_coef=coef, center_router=False)  # let the mean row move
        assert ("router_z_loss_coef" in run.to_dict()) == bool(coef)
        out = tmp_path / f"z{coef}"
        grok.train(run, out, progress=False)
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        return [w.detach().mean(0) for w in grok.router_weights(trained)]

    without, with_z = mean_rows(0.0), mean_rows(1.0)
    assert max(float((a - b).abs().max()) for a, b in zip(without, with_z)) > 1e-3


def test_pathway_monitor_tracks_generalisation_on_the_main_series_only(root: Path) -> None:
    """The METHODS §6 claim on the shipped checkpoints (fixed ε, checkpoints after memorisation): on the
    main series pathway distance falls and smoothness rises with test accuracy at τ = 0.7; the label-shuffled
    control, whose test accuracy never leaves chance, shows no rising smoothness."""
    from mechkit.moe import PathwayConfig, pathway_monitor, split_samples

    corr = {}
    for series, folder in _series(root).items():
        train, test = split_samples(folder)
        result = pathway_monitor(folder, train, test, PathwayConfig(taus=(TAU,), progress=False))
        corr[series] = result.correlations().set_index("metric")
        assert corr[series].loc["smoothness", "checkpoints"] >= 5
    assert corr["main"].loc[f"distance (tau {TAU})", "pearson"] < -0.5
    assert corr["main"].loc["smoothness", "pearson"] > 0.5
    assert corr["control"].loc["smoothness", "pearson"] < 0.5
