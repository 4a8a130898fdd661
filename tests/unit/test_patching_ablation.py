"""Ablations: means over real tokens only (a padded batch equals prompts taken one by one), each kind
writes exactly the chosen component, resampling is seeded and draws real reference rows, and the
sweep's unablated score is the model's plain accuracy on each task set."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit import tasks
from mechkit.errors import MechkitError
from mechkit.models.inputs import Batch
from mechkit.patching.ablation import AblationResult, ablation, ablation_sweep, components, reference_means
from tests.conftest import VOCAB, tiny_hf_model

LENGTHS = [6, 3, 5, 6, 2]
SITES = ["blocks.0.attn.z.h1", "blocks.1.mlp.out", "blocks.0.mlp.post", "blocks.1.attn.out"]


def _batch(seed: int = 0, lengths=LENGTHS) -> Batch:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths])
    return Batch(torch.randint(2, VOCAB, (len(lengths), width), generator=g) * mask, mask)


@pytest.fixture(scope="module")
def model():
    return mechkit.load(tiny_hf_model("gpt2"))


@pytest.fixture(scope="module")
def facts_lm():
    return mechkit.load("zoo:facts-lm")


def test_mean_is_over_real_tokens_only(model):
    batch = _batch()
    means = reference_means(model, batch, SITES, batch_size=2)  # chunks with their own padding
    for site in SITES:
        tokens = []
        for row, length in enumerate(LENGTHS):  # each prompt alone: no padding anywhere
            alone = Batch(batch.input_ids[row : row + 1, :length], batch.attention_mask[row : row + 1, :length])
            tokens.append(model.run_with_cache(alone, site).cache[site][0])
        expected = torch.cat(tokens).double().mean(0).float()
        torch.testing.assert_close(means[site], expected, atol=1e-5, rtol=0)
    assert means["blocks.0.attn.z.h1"].shape == (8,) and means["blocks.0.mlp.post"].shape == (128,)


def test_mean_and_zero_ablation_write_only_the_component(model):
    reference, target = _batch(0), _batch(1, [4, 6, 6])
    means = reference_means(model, reference, ["blocks.0.attn.z"])
    real = target.attention_mask.bool()
    clean = model.run_with_cache(target, "blocks.0.attn.z").cache["blocks.0.attn.z"]
    run = model.run_with_interventions(target, ablation(model, ["L0.H1"], "mean", reference=reference),
                                       cache="blocks.0.attn.z").cache["blocks.0.attn.z"]
    assert torch.allclose(run[real][:, 1], means["blocks.0.attn.z"][1].expand(int(real.sum()), -1), atol=1e-5)
    torch.testing.assert_close(run[:, :, [0, 2, 3]], clean[:, :, [0, 2, 3]])
    torch.testing.assert_close(run[~real], clean[~real])  # padding is never written
    post = "blocks.0.mlp.post"
    before = model.run_with_cache(target, post).cache[post]
    after = model.run_with_interventions(target, ablation(model, ["L0.N3", "L0.N5"], "zero"), cache=post).cache[post]
    assert after[real][:, [3, 5]].abs().max() == 0
    keep = [i for i in range(before.shape[-1]) if i not in (3, 5)]
    torch.testing.assert_close(after[..., keep], before[..., keep])
    layer = ablation(model, ["L1"], "zero")
    assert set(layer) == {"blocks.1.attn.out", "blocks.1.mlp.out"}
    logits = model.run_with_interventions(target, layer).logits
    resid = model.run_with_cache(target, "blocks.1.resid_pre").cache["blocks.1.resid_pre"]
    with torch.no_grad():  # both sublayers gone: the final residual is the layer's input
        expected = model.torch_module.lm_head(model.torch_module.transformer.ln_f(resid))
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)


def test_resample_is_seeded_and_draws_reference_rows(model):
    reference, target = _batch(2, [6, 6, 5, 6]), _batch(3, [5, 6, 4])
    site = "blocks.1.attn.out"
    donors = model.run_with_cache(reference, site).cache[site]

    def resampled(seed):
        return model.run_with_interventions(target, ablation(model, ["L1.attn"], "resample", reference=reference,
                                                             seed=seed), cache=site).cache[site]

    first, again = resampled(7), resampled(7)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    real = target.attention_mask.bool()
    draws = set()
    for row, length in enumerate(real.sum(-1).tolist()):
        match = [j for j in range(donors.shape[0])
                 if torch.allclose(first[row, :length], donors[j, :length], atol=1e-6)]
        assert match, f"row {row} is not a reference row's activation"
        draws.add(match[0])
    other = [resampled(s) for s in range(6)]
    assert any(not torch.allclose(o, first) for o in other)  # the seed chooses the donors


def test_components_and_bad_input(model):
    names = [c.name for c in components(model, ["attn", "mlp"])]
    assert names == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert [c.name for c in components(model, "heads")][:2] == ["L0.H0", "L0.H1"]
    assert components(model, ["blocks.1.attn.z.h2"])[0].sites == ("blocks.1.attn.z.h2",)
    for bad in ("L9.attn", "L0.H7", "L0.N999", "blocks.0.attn.pattern", "what"):
        with pytest.raises(MechkitError, match=r"components are 'L<layer>\.H<head>'"):
            components(model, [bad])
    with pytest.raises(MechkitError, match="needs reference"):
        ablation(model, ["L0.attn"], "mean")
    with pytest.raises(MechkitError, match="kind="):
        ablation(model, ["L0.attn"], "median")


def test_sweep_baseline_is_the_models_accuracy_and_each_row_its_ablation(facts_lm):
    task_sets = {"recall": tasks.generate("facts", 24, 0), "reasoning": tasks.generate("ioi", 12, 0)}
    result = ablation_sweep(facts_lm, task_sets, components=["L0.attn", "L2.mlp", "L0.H3"], kind="zero",
                            batch_size=10)
    assert isinstance(result, AblationResult) and result.axes == ("component", "task")
    for j, data in enumerate(task_sets.values()):
        hits, zeroed = [], []
        for item in data:
            ids = facts_lm.tokenize(item.prompt)
            answer = facts_lm.tokenizer(item.answer, add_special_tokens=False)["input_ids"][0]
            hits.append(int(facts_lm(ids)[0, -1].argmax()) == answer)
            logits = facts_lm.run_with_interventions(ids, {"blocks.0.attn.out": mechkit.interventions.Zero()}).logits
            zeroed.append(int(logits[0, -1].argmax()) == answer)
        assert float(result.baseline[j]) == pytest.approx(sum(hits) / len(hits))
        assert float(result.ablated[0, j]) == pytest.approx(sum(zeroed) / len(zeroed))
        assert float(result.scores[0, j]) == pytest.approx(sum(hits) / len(hits) - sum(zeroed) / len(zeroed))
    table = result.table()
    assert list(table.index) == ["none", "L0.attn", "L2.mlp", "L0.H3"]
    assert {"recall accuracy", "recall drop", "reasoning accuracy", "reasoning drop"} <= set(table.columns)
    assert result.plot() is not None and "L0.attn" in result.hurts(0.2)


def test_sweep_result_round_trips(tmp_path, facts_lm):
    task_sets = {"recall": tasks.generate("facts", 8, 1), "reasoning": tasks.generate("two_hop", 8, 1)}
    result = ablation_sweep(facts_lm, task_sets, components=["L1"], kind="mean", metric="logprob")
    result.save(tmp_path / "r")
    assert mechkit.results.Result.load(tmp_path / "r").equals(result)
    with pytest.raises(MechkitError, match="no task sets"):
        ablation_sweep(facts_lm, {})
    with pytest.raises(MechkitError, match="one answer per prompt"):
        ablation_sweep(facts_lm, {"x": (["The snarp is"], [])})
