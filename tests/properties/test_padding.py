"""Padding is never data: interventions on right-padded batches equal the same edits row by row."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.interventions import Add, Mean, Replace, Resample, Zero
from mechkit.selection import RunContext, position_mask
from tests.conftest import VOCAB, tiny_hf_model

LENGTHS = (7, 4, 5)
SITE = "blocks.0.resid_post"


def ragged(lengths=LENGTHS, seed=3):
    """Token-id rows of different lengths (a list of lists, right-padded by mechkit)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return mechkit.load(tiny_hf_model(request.param))


def _rowwise(model, rows, interventions_for_row):
    """Logits of each row run alone, unpadded, with that row's interventions."""
    return [model.run_with_interventions([row], interventions_for_row(i)).logits[0] for i, row in enumerate(rows)]


def _assert_rows_equal(batched, rows_logits, lengths):
    for i, (expected, n) in enumerate(zip(rows_logits, lengths)):
        torch.testing.assert_close(batched[i, :n], expected[:n], atol=1e-5, rtol=0, msg=f"row {i}")


@pytest.mark.parametrize("positions", ["last", -1, -2, 0, [1, -1]])
def test_replace_at_positions_equals_row_by_row(model, positions):
    clean, corrupt = ragged(seed=3), ragged(seed=4)
    _, clean_cache = model.run_with_cache(clean, SITE)
    batched = model.run_with_interventions(corrupt, {SITE: Replace(source=clean_cache, positions=positions)}).logits

    def row_ivs(i):
        _, row_cache = model.run_with_cache([clean[i]], SITE)
        return {SITE: Replace(source=row_cache, positions=positions)}

    _assert_rows_equal(batched, _rowwise(model, corrupt, row_ivs), LENGTHS)


def test_last_patches_each_rows_last_real_token_not_the_padding(model):
    rows = ragged()
    _, cache = model.run_with_interventions(rows, {SITE: Zero(positions="last")}, cache=SITE)
    act = cache[SITE]
    for i, n in enumerate(LENGTHS):
        assert torch.all(act[i, n - 1] == 0)
        assert torch.all(act[i, : n - 1].abs().sum(-1) > 0)


def test_source_with_other_padding_is_realigned_by_real_tokens(model):
    """Clean prompts longer than the corrupt ones: 'last' pairs each row's last real tokens."""
    clean, corrupt = ragged((5, 7, 6), seed=5), ragged(seed=6)
    _, clean_cache = model.run_with_cache(clean, SITE)
    _, patched = model.run_with_interventions(corrupt, {SITE: Replace(source=clean_cache, positions="last")},
                                              cache=SITE)
    for i, (nc, nk) in enumerate(zip((5, 7, 6), LENGTHS)):
        torch.testing.assert_close(patched[SITE][i, nk - 1], clean_cache[SITE][i, nc - 1])


def test_source_missing_a_patched_token_is_an_error(model):
    clean, corrupt = ragged((3, 3, 3), seed=5), ragged(seed=6)
    _, clean_cache = model.run_with_cache(clean, SITE)
    with pytest.raises(MechkitError, match="fewer real tokens"):
        model.run_with_interventions(corrupt, {SITE: Replace(source=clean_cache, positions=[3])})


def test_mean_ignores_padding(model):
    rows = ragged()
    _, base = model.run_with_cache(rows, SITE)
    act, real = base[SITE], base.attention_mask.bool()
    _, ablated = model.run_with_interventions(rows, {SITE: Mean(over="tokens")}, cache=SITE)
    expected = act[real].mean(0)
    torch.testing.assert_close(ablated[SITE][real], expected.expand(int(real.sum()), -1), atol=1e-6, rtol=0)
    _, per_pos = model.run_with_interventions(rows, {SITE: Mean()}, cache=SITE)
    for p in range(act.shape[1]):
        keep = real[:, p]
        torch.testing.assert_close(per_pos[SITE][keep, p], act[keep, p].mean(0).expand(int(keep.sum()), -1))
    # padding positions are never written
    torch.testing.assert_close(per_pos[SITE][~real], act[~real])


def test_resample_draws_only_rows_covering_the_patched_tokens(model):
    rows = ragged((7, 4, 5, 7))
    _, base = model.run_with_cache(rows, SITE)
    _, out = model.run_with_interventions(rows, {SITE: Resample(seed=0)}, cache=SITE)
    act = base[SITE]
    for i, n in enumerate((7, 4, 5, 7)):
        donors = [j for j in range(4) if j != i and torch.allclose(out[SITE][i, :n], act[j, :n])]
        assert donors, f"row {i} got no other row's activations"


def test_add_on_padded_batch_equals_row_by_row(model):
    rows = ragged()
    vector = torch.randn(32)
    batched = model.run_with_interventions(rows, {SITE: Add(vector=vector)}).logits
    _assert_rows_equal(batched, _rowwise(model, rows, lambda i: {SITE: Add(vector=vector)}), LENGTHS)


def test_per_row_head_selector_equals_separate_runs(model):
    """One forward holding a different head ablation per row equals one run per variant."""
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)).expand(4, -1)
    heads = torch.eye(4, dtype=torch.bool)  # row r ablates head r
    batched = model.run_with_interventions(ids, {"blocks.1.attn.z": Zero(heads=heads)}).logits
    for r in range(4):
        alone = model.run_with_interventions(ids[:1], {"blocks.1.attn.z": Zero(heads=[r])}).logits
        torch.testing.assert_close(batched[r], alone[0], atol=1e-5, rtol=0)


def test_position_mask_counts_real_tokens():
    ctx = RunContext(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert position_mask("last", ctx).tolist() == [[False, False, True, False], [False, True, False, False]]
    assert position_mask(-2, ctx).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert position_mask(slice(1, None), ctx).tolist() == [[False, True, True, False], [False, True, False, False]]
    assert position_mask("real", ctx).tolist() == ctx.real.tolist()
    with pytest.raises(MechkitError, match="row 1, which has 2 real tokens"):
        position_mask(2, ctx)


@pytest.mark.parametrize("backend", ["lens", "nnsight"])
def test_backends_agree_on_padded_positions_and_per_row_selectors(backend):
    pytest.importorskip("transformer_lens" if backend == "lens" else "nnsight")
    hf = tiny_hf_model("gpt2")
    ref, other = mechkit.load(hf), mechkit.load(hf, backend=backend)
    clean, corrupt = ragged(seed=3), ragged(seed=4)
    _, clean_cache = ref.run_with_cache(clean, SITE)
    heads = torch.tensor([[True, False, False, False], [False, True, True, False], [False, False, False, True]])
    ivs = {SITE: Replace(source=clean_cache, positions="last"), "blocks.1.attn.z": Zero(heads=heads, positions=-2),
           "blocks.0.mlp.post": Mean(over="tokens")}
    expected = ref.run_with_interventions(corrupt, ivs).logits
    got = other.run_with_interventions(corrupt, ivs).logits
    real = ref.to_tokens(corrupt).attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
