"""Path patching against direct computations: in a 1-layer model it is the head's direct effect on the
logits (from the weights) or plain activation patching of the head; a q/k/v receiver gets exactly the
receiver's normalised input with the sender's output difference added; batching senders changes nothing."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError
from mechkit.interventions import Replace
from mechkit.models.inputs import Batch
from mechkit.patching.metrics import logit_diff
from mechkit.patching.pairs import PatchingPairs
from mechkit.patching.path import path_patching
from tests.conftest import VOCAB, tiny_hf_model

ATOL = 1e-4
LENGTHS = [7, 5, 6, 7]  # padded rows: positions are counted among real tokens


def _pairs(seed: int = 0, same: bool = False) -> PatchingPairs:
    g = torch.Generator().manual_seed(seed)
    n, width = len(LENGTHS), max(LENGTHS)
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in LENGTHS])
    clean = torch.randint(2, VOCAB, (n, width), generator=g) * mask
    corrupt = clean.clone()
    if not same:
        corrupt[:, 1] = torch.randint(2, VOCAB, (n,), generator=g)
        corrupt[:, 3] = torch.randint(2, VOCAB, (n,), generator=g)
    answers, wrong = torch.randint(2, VOCAB, (n,), generator=g), torch.randint(2, VOCAB, (n,), generator=g)
    prompts = tuple(str(i) for i in range(n))
    return PatchingPairs(Batch(clean, mask), Batch(corrupt, mask), answers, wrong, prompts, prompts)


@pytest.fixture(scope="module")
def one_layer():
    hf = tiny_hf_model("gpt2", n_layer=1)
    return hf, mechkit.load(hf)


@pytest.fixture(scope="module")
def two_layer():
    hf = tiny_hf_model("gpt2")
    return hf, mechkit.load(hf)


def _normalised(logits, pairs, m_clean, m_corrupt):
    return (float(logit_diff(logits, pairs).mean()) - m_clean) / (m_corrupt - m_clean)


def _ends(model, pairs):
    return (float(logit_diff(model(pairs.clean), pairs).mean()), float(logit_diff(model(pairs.corrupt), pairs).mean()))


def _head_delta(hf, model, pairs, layer, head):
    """The sender head's output difference (corrupt − clean) in the residual stream, from c_proj's weights."""
    z = f"blocks.{layer}.attn.z"
    clean, corrupt = model.run_with_cache(pairs.clean, z).cache[z], model.run_with_cache(pairs.corrupt, z).cache[z]
    d_head = clean.shape[-1]
    w = hf.transformer.h[layer].attn.c_proj.weight[head * d_head : (head + 1) * d_head]  # Conv1D: x @ W
    delta = (corrupt - clean)[:, :, head] @ w
    return delta * pairs.clean.attention_mask[..., None]


def test_one_layer_equals_the_direct_patch_of_the_head_to_the_logits(one_layer):
    hf, model = one_layer
    pairs = _pairs()
    m_clean, m_corrupt = _ends(model, pairs)
    result = path_patching(model, pairs, receivers=["logits"], freeze_mlps=True)
    assert result.axes == ("sender", "receiver") and result.labels["sender"] == [f"L0.H{h}" for h in range(4)]
    resid = model.run_with_cache(pairs.clean, "blocks.0.resid_post").cache["blocks.0.resid_post"]
    for head in range(4):
        with torch.no_grad():
            logits = hf.lm_head(hf.transformer.ln_f(resid + _head_delta(hf, model, pairs, 0, head)))
        expected = _normalised(logits, pairs, m_clean, m_corrupt)
        assert float(result.scores[head, 0]) == pytest.approx(expected, abs=ATOL)
    assert result.clean == pytest.approx(m_clean, abs=1e-5) and result.corrupt == pytest.approx(m_corrupt, abs=1e-5)


def test_one_layer_without_freezing_equals_activation_patching_of_the_head(one_layer):
    _, model = one_layer
    pairs = _pairs(1)
    m_clean, m_corrupt = _ends(model, pairs)
    corrupt = model.run_with_cache(pairs.corrupt, "blocks.0.attn.z").cache
    result = path_patching(model, pairs, senders=[(0, 2), "L0.H0", "blocks.0.attn.z.h3"])
    assert result.labels["sender"] == ["L0.H2", "L0.H0", "L0.H3"]
    for row, head in enumerate([2, 0, 3]):
        logits = model.run_with_interventions(pairs.clean, {f"blocks.0.attn.z.h{head}": Replace(source=corrupt)}).logits
        assert float(result.scores[row, 0]) == pytest.approx(_normalised(logits, pairs, m_clean, m_corrupt), abs=ATOL)
    raw = path_patching(model, pairs, senders=[(0, 2)], normalize=False)
    logits = model.run_with_interventions(pairs.clean, {"blocks.0.attn.z.h2": Replace(source=corrupt)}).logits
    assert float(raw.scores[0, 0]) == pytest.approx(float(logit_diff(logits, pairs).mean()), abs=ATOL)


def test_a_value_receiver_gets_its_normalised_input_plus_the_senders_difference(two_layer):
    hf, model = two_layer
    pairs = _pairs(2)
    m_clean, m_corrupt = _ends(model, pairs)
    receivers = ["blocks.1.attn.v_in.h2", "blocks.1.attn.q_in.h0+blocks.1.attn.k_in.h0", "blocks.1.attn.v.h2"]
    result = path_patching(model, pairs, receivers=receivers, freeze_mlps=True)
    resid = model.run_with_cache(pairs.clean, "blocks.1.resid_pre").cache["blocks.1.resid_pre"]
    for head in range(4):
        with torch.no_grad():
            new_input = hf.transformer.h[1].ln_1(resid + _head_delta(hf, model, pairs, 0, head))
        logits = model.run_with_interventions(pairs.clean, {"blocks.1.attn.v_in.h2": Replace(source=new_input)}).logits
        assert float(result.scores[head, 0]) == pytest.approx(_normalised(logits, pairs, m_clean, m_corrupt), abs=ATOL)
    # the projected value is a function of that head's input alone: the same scores
    torch.testing.assert_close(result.scores[:, 2], result.scores[:, 0], atol=ATOL, rtol=0, equal_nan=True)
    # a sender in the receivers' own layer has no path to them
    assert torch.isnan(result.scores[4:]).all() and not torch.isnan(result.scores[:4]).any()


def test_a_z_receiver_equals_all_three_inputs_of_that_head(two_layer):
    _, model = two_layer
    pairs = _pairs(3)
    both = path_patching(model, pairs, senders=["L0"], receivers=[
        "blocks.1.attn.z.h1", "blocks.1.attn.q_in.h1+blocks.1.attn.k_in.h1+blocks.1.attn.v_in.h1", "logits"])
    torch.testing.assert_close(both.scores[:, 0], both.scores[:, 1], atol=ATOL, rtol=0)
    alone = path_patching(model, pairs, senders=["L0"], receivers=["logits"])
    torch.testing.assert_close(both.scores[:, 2], alone.scores[:, 0], atol=1e-6, rtol=0)


def test_batching_senders_changes_nothing(two_layer):
    _, model = two_layer
    pairs = _pairs(4)
    receivers = ["logits", "blocks.1.attn.q_in", "blocks.1.attn.z.h3"]
    one = path_patching(model, pairs, receivers=receivers, positions=[1, 3], batch_size=1)
    many = path_patching(model, pairs, receivers=receivers, positions=[1, 3], batch_size=10_000)
    assert one.scores.shape == (8, 3)
    torch.testing.assert_close(one.scores, many.scores, atol=1e-5, rtol=0, equal_nan=True)
    # patching the sender only where the prompts do not differ has no effect at all
    none = path_patching(model, pairs, receivers=receivers, positions=[0])
    assert float(none.scores.nan_to_num().abs().max()) < 1e-5


def test_same_scores_through_the_lens_backend(two_layer):
    from mechkit.models.lens import LensModel

    hf, model = two_layer
    lens = LensModel.from_hf(hf)
    pairs = _pairs(5)
    ref = path_patching(model, pairs, receivers=["logits", "blocks.1.attn.v_in.h0"], freeze_mlps=True)
    got = path_patching(lens, pairs, receivers=["logits", "blocks.1.attn.v.h0"], freeze_mlps=True)
    torch.testing.assert_close(got.scores, ref.scores, atol=ATOL, rtol=0, equal_nan=True)
    with pytest.raises(MechkitError, match=r"attn\.v' gives the same"):
        path_patching(lens, pairs, receivers=["blocks.1.attn.v_in.h0"])


def test_bad_input_is_a_clear_error(two_layer):
    _, model = two_layer
    pairs = _pairs(6)
    with pytest.raises(MechkitError, match="no effect to explain"):
        path_patching(model, _pairs(6, same=True))
    for bad in ("L2.H0", "L0.H4", "head 3", "blocks.5.attn.z"):
        with pytest.raises(MechkitError, match=r"L<layer>\.H<head>"):
            path_patching(model, pairs, senders=[bad])
    for bad in ("blocks.1.resid_post", "blocks.2.attn.q_in", "blocks.1.attn.q_in.h7", "nonsense"):
        with pytest.raises(MechkitError, match=r"valid receivers: 'logits'.*attn\.q_in"):
            path_patching(model, pairs, receivers=[bad])
    with pytest.raises(MechkitError, match="on its own"):
        path_patching(model, pairs, receivers=["logits+blocks.1.attn.q_in"])
    with pytest.raises(MechkitError, match="receivers"):
        path_patching(model, pairs, receivers=[])
    with pytest.raises(MechkitError, match="NaN"):
        path_patching(model, pairs, metric=lambda logits, targets: torch.full((logits.shape[0],), float("nan")))
