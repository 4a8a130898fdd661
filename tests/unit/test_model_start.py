"""``run_with_interventions(start=...)``: a run resumed from a cached residual stream equals the
full run, skips the blocks below its start on the backends that can, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.interventions import Add, Zero
from mechkit.models.torch_hooks import TorchHooksModel
from tests.conftest import tiny_hf_model, tiny_ids


def _backends(arch: str):
    hf = tiny_hf_model(arch, num_hidden_layers=3, n_layer=3) if arch == "gpt2" else tiny_hf_model(
        arch, num_hidden_layers=3)
    out = [TorchHooksModel(hf)]
    if arch == "gpt2":
        pytest.importorskip("transformer_lens")
        from mechkit.models.lens import LensModel, hooked_transformer_from_gpt2

        out.append(LensModel(hooked_transformer_from_gpt2(hf)))
    return out


def _mask_batch(model, ids):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded row: the resumed run must honour the mask like the full one
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "olmoe"])
def test_resumed_run_equals_the_full_run(arch):
    ids = tiny_ids(3, 7)
    for model in _backends(arch):
        batch = _mask_batch(model, ids)
        edits = {"blocks.2.attn.z": Zero(heads=[1], positions="last"), "blocks.1.mlp.out": Add(vector=torch.ones(32))}
        full = model.run_with_interventions(batch, edits, cache=["blocks.1.resid_pre", "blocks.2.resid_post"])
        start = model.run_with_cache(batch, "blocks.1.resid_pre").cache["blocks.1.resid_pre"]
        resumed = model.run_with_interventions(batch, edits, cache="blocks.2.resid_post",
                                               start=("blocks.1.resid_pre", start))
        real = batch["attention_mask"].bool()
        assert torch.allclose(resumed.logits[real], full.logits[real], atol=1e-5), model.backend
        assert torch.allclose(resumed.cache["blocks.2.resid_post"][real], full.cache["blocks.2.resid_post"][real],
                              atol=1e-5)


def test_start_value_is_what_block_L_reads():
    model = TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=3))
    ids = tiny_ids(2, 5)
    other = model.run_with_cache(tiny_ids(2, 5, seed=9), "blocks.2.resid_pre").cache["blocks.2.resid_pre"]
    resumed = model.run_with_interventions(ids, {}, cache="blocks.2.resid_pre", start=("blocks.2.resid_pre", other))
    patched = model.run_with_interventions(ids, {"blocks.2.resid_pre": lambda act: other})
    assert torch.equal(resumed.cache["blocks.2.resid_pre"], other)
    assert torch.allclose(resumed.logits, patched.logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_blocks_below_the_start_do_not_run(arch):
    for model in _backends(arch):
        calls: list[int] = []
        attn = model.torch_module.get_submodule(
            "blocks.0.attn" if model.backend == "lens" else ("transformer.h.0.attn" if arch == "gpt2"
                                                              else "model.layers.0.self_attn"))
        handle = attn.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            ids = tiny_ids(2, 5)
            start = model.run_with_cache(ids, "blocks.1.resid_pre").cache["blocks.1.resid_pre"]
            calls.clear()
            model.run_with_interventions(ids, {}, start=("blocks.1.resid_pre", start))
            assert calls == [], model.backend
            model(ids)  # and the stubs are gone afterwards
            assert calls == [1]
        finally:
            handle.remove()


def test_stubs_are_removed_after_an_exception():
    model = TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=3))
    ids = tiny_ids(2, 5)
    start = model.run_with_cache(ids, "blocks.2.resid_pre").cache["blocks.2.resid_pre"]

    def boom(act):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_interventions(ids, {"blocks.2.mlp.out": boom}, start=("blocks.2.resid_pre", start))
    assert all("forward" not in layer.__dict__ for layer in model.torch_module.model.layers)
    assert torch.allclose(model(ids), model.run_with_interventions(ids, {}).logits)


def test_bad_starts_are_clear_errors():
    model = TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=3))
    ids = tiny_ids(2, 5)
    start = model.run_with_cache(ids, "blocks.2.resid_pre").cache["blocks.2.resid_pre"]
    with pytest.raises(MechkitError, match=r"below blocks\.2\.resid_pre"):
        model.run_with_interventions(ids, {"blocks.1.mlp.out": Zero()}, start=("blocks.2.resid_pre", start))
    with pytest.raises(MechkitError, match="below"):
        model.run_with_interventions(ids, {}, cache="blocks.0.resid_post", start=("blocks.2.resid_pre", start))
    with pytest.raises(MechkitError, match="shape"):
        model.run_with_interventions(ids, {}, start=("blocks.2.resid_pre", start[:1]))
    with pytest.raises(MechkitError, match="resid_pre"):
        model.run_with_interventions(ids, {}, start=("blocks.2.resid_post", start))
    with pytest.raises(TypeError, match="pair"):
        model.run_with_interventions(ids, {}, start=start)


def test_active_contexts_below_the_start_are_refused():
    model = TorchHooksModel(tiny_hf_model("llama", num_hidden_layers=3))
    ids = tiny_ids(2, 5)
    start = model.run_with_cache(ids, "blocks.2.resid_pre").cache["blocks.2.resid_pre"]
    with model.intervene({"blocks.0.mlp.out": Zero()}):
        assert [str(s) for s in model.edited_sites] == ["blocks.0.mlp.out"]
        with pytest.raises(MechkitError, match=r"blocks\.0\.mlp\.out lies below"):
            model.run_with_interventions(ids, {}, start=("blocks.2.resid_pre", start))
    assert model.edited_sites == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_token_logits_equal_the_full_run(arch):
    for model in _backends(arch):
        ids = tiny_ids(3, 7)
        batch = _mask_batch(model, ids)
        edits = {"blocks.1.mlp.out": Add(vector=torch.ones(32))}
        full = model.run_with_interventions(batch, edits).logits
        last = model.run_with_interventions(batch, edits, logits_at="last").logits
        rows, at = torch.arange(3), torch.tensor([4, 6, 6])
        assert last.shape == full.shape
        assert torch.allclose(last[rows, at], full[rows, at], atol=1e-5), model.backend
        keep = torch.zeros(full.shape[:2], dtype=torch.bool)
        keep[rows, at] = True
        assert bool(last[~keep].isnan().all())


def test_last_token_logits_refuse_the_logits_site():
    model = TorchHooksModel(tiny_hf_model("llama"))
    with pytest.raises(MechkitError, match="logits site"):
        model.run_with_interventions(tiny_ids(2, 5), {}, cache="logits", logits_at="last")
    with pytest.raises(MechkitError, match="'last' or None"):
        model.run_with_interventions(tiny_ids(2, 5), {}, logits_at="all")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_token_logits_skip_the_other_positions(arch):
    for model in _backends(arch):
        head = model.torch_module.unembed if model.backend == "lens" else model.torch_module.lm_head
        widths: list[int] = []
        handle = head.register_forward_hook(lambda mod, args, out, widths=widths: widths.append(args[0].shape[1]))
        try:
            model.run_with_interventions(_mask_batch(model, tiny_ids(3, 7)), {}, logits_at="last")
        finally:
            handle.remove()
        assert widths == [2], model.backend  # rows end at positions 4 and 6
