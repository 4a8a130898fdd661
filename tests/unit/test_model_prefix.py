"""``run_with_interventions(prefix=n)``: a run that reuses the unedited first n positions equals the
full run at every later position, computes only those on torch_hooks, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.interventions import Add, Replace
from mechkit.models.torch_hooks import TorchHooksModel
from tests.conftest import tiny_hf_model, tiny_ids


def _model(arch: str) -> TorchHooksModel:
    if arch == "gpt2":
        return TorchHooksModel(tiny_hf_model(arch, n_layer=3))
    return TorchHooksModel(tiny_hf_model(arch, num_hidden_layers=3))


def _padded(ids):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    mask[2, -1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "olmoe"])
def test_prefix_run_equals_the_full_run_after_the_prefix(arch):
    model, n = _model(arch), 3
    batch = _padded(tiny_ids(3, 8))
    source = model.run_with_cache(_padded(tiny_ids(3, 8, seed=5)), "blocks.1.attn.z").cache["blocks.1.attn.z"]
    later = torch.zeros(3, 8, dtype=torch.bool)
    later[:, n:] = True
    heads = torch.tensor([[True, False, False, False], [False, True, False, False], [False, False, True, True]])
    edits = {"blocks.1.attn.z": Replace(source=source, positions=later, heads=heads),
             "blocks.2.resid_pre": Add(vector=torch.ones(32), positions="last")}
    full = model.run_with_interventions(batch, edits)
    reused = model.run_with_interventions(batch, edits, prefix=n)
    real = batch["attention_mask"].bool()
    real[:, :n] = False
    assert torch.allclose(reused.logits[real], full.logits[real], atol=1e-5)
    assert torch.isnan(reused.logits[:, :n]).all()
    start = model.run_with_cache(batch, "blocks.1.resid_pre").cache["blocks.1.resid_pre"]
    both = model.run_with_interventions(batch, edits, prefix=n, start=("blocks.1.resid_pre", start), logits_at="last")
    rows, last = torch.arange(3), batch["attention_mask"].sum(-1) - 1
    assert torch.allclose(both.logits[rows, last], full.logits[rows, last], atol=1e-5)


def test_prefix_positions_are_not_computed():
    model, n = _model("llama"), 5
    seen = []
    block = model.module.model.layers[0]
    handle = block.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        model.run_with_interventions(tiny_ids(4, 8), {"blocks.2.mlp.out": Add(vector=torch.ones(32))}, prefix=n)
    finally:
        handle.remove()
    assert seen == [n, 8 - n]  # one pass over the prefixes, then the later positions only


def test_rows_sharing_a_prefix_share_its_pass():
    model = _model("llama")
    ids = tiny_ids(2, 6).repeat(3, 1)
    seen = []
    handle = model.module.model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        model.run_with_interventions(ids, {}, prefix=2)
    finally:
        handle.remove()
    assert seen == [2, 6]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prefix": -1}, "prefix must be"),
    ({"prefix": 6}, "leaves no position"),
    ({"prefix": 2, "cache": "blocks.0.resid_post"}, "records no sites"),
])
def test_prefix_refusals(kwargs, message):
    model = _model("llama")
    with pytest.raises(MechkitError, match=message):
        model.run_with_interventions(tiny_ids(2, 6), {}, **kwargs)


def test_prefix_refuses_pattern_writes_and_active_contexts():
    model = _model("llama")
    with pytest.raises(MechkitError, match="one position axis"):
        model.run_with_interventions(tiny_ids(2, 6), {"blocks.0.attn.pattern": lambda p: p}, prefix=2)
    with model.intervene({"blocks.0.mlp.out": Add(vector=torch.ones(32))}), pytest.raises(
            MechkitError, match="intervene / splice"):
        model.run_with_interventions(tiny_ids(2, 6), {}, prefix=2)


def test_patching_reuses_the_prefix_the_pairs_share():
    from mechkit.models.inputs import Batch
    from mechkit.patching.activation import shared_prefix
    from mechkit.patching.pairs import PatchingPairs

    model = _model("llama")
    clean = tiny_ids(3, 7)
    corrupt = clean.clone()
    corrupt[0, 4], corrupt[1, 6], corrupt[2, 5] = clean[0, 4] + 1, clean[1, 6] + 1, clean[2, 5] + 1
    mask = torch.ones_like(clean)
    mask[1, 6] = 0  # a padded difference is no difference
    pairs = PatchingPairs(Batch(clean, mask), Batch(corrupt, mask), torch.tensor([4, 5, 6]), None, (), ())
    assert shared_prefix(model, pairs) == 4
    mask[0, 4:] = 0
    pairs = PatchingPairs(Batch(clean, mask), Batch(corrupt, mask), torch.tensor([4, 5, 6]), None, (), ())
    assert shared_prefix(model, pairs) == 3  # below the shortest row's last token
    with model.intervene({"blocks.0.mlp.out": Add(vector=torch.ones(32))}):
        assert shared_prefix(model, pairs) == 0


def test_a_prefix_cache_serves_many_runs_over_the_same_prompts():
    model, n = _model("llama"), 3
    prompts = tiny_ids(3, 7)
    cache = model.prefix_cache(prompts, n)
    seen = []
    handle = model.module.model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        rows = torch.tensor([2, 0, 2, 1])
        edits = {"blocks.1.mlp.out": Add(vector=torch.ones(32), positions="last")}
        reused = model.run_with_interventions(prompts[rows], edits, prefix=cache)
    finally:
        handle.remove()
    full = model.run_with_interventions(prompts[rows], edits)
    assert seen == [torch.Size([4, 7 - n, 32])]  # the prefixes are not computed again
    assert torch.allclose(reused.logits[:, n:], full.logits[:, n:], atol=1e-5)
    with pytest.raises(MechkitError, match="does not hold"):
        model.run_with_interventions(tiny_ids(2, 7, seed=3), {}, prefix=cache)
    with pytest.raises(MechkitError, match="1 to 7 positions"):
        model.prefix_cache(prompts, 0)
