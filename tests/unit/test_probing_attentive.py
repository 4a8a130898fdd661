"""Attentive probes: EP pooling against a hand-written softmax pooling, the parameter formula, padding,
the multi-head baseline against nn.MultiheadAttention, the exact folding of standardisation, the
method's claim (a signal in one of 49 tokens that mean pooling drowns), bad input, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.probing.attentive import AttentionProbe, AttentiveProbe, EfficientProbe

sk = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402


def tokens(n=6, t=9, d=16, seed=0, dtype=torch.float32):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ragged(n=6, t=9, d=16, seed=0):
    """A padded batch with mixed lengths (1 … t) and garbage in the padding."""
    x = tokens(n, t, d, seed)
    lengths = torch.tensor([t, 1, 4, t - 1, 2, 7])[:n]
    mask = torch.arange(t)[None] < lengths[:, None]
    x[~mask] = 1e3  # must not matter
    return x, mask, lengths


def one_token_task(n=2000, t=49, d=64, amp=6.0, seed=0):
    """Two classes; the class lives in ONE random token (amp · a class direction added to a noise
    token), the other 48 tokens are pure N(0, I) noise. Mean pooling sees the signal at 1/49 strength."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    directions = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # orthonormal
    position = torch.randint(0, t, (n,), generator=g)
    x[torch.arange(n), position] += amp * directions[y]
    return x, y, position


# --- 1. EP with one query and an identity value projection is plain softmax pooling -----------------

def test_single_query_identity_values_is_softmax_pooling():
    x = tokens(d=32, dtype=torch.float64)
    probe = EfficientProbe(32, 3, n_queries=1, d_out=1).double()
    with torch.no_grad():
        probe.w_v.copy_(torch.eye(32, dtype=torch.float64))
        probe.queries.mul_(40)  # sharpen the attention so the check is not near-uniform
    u = probe.queries[0]
    by_hand = torch.stack([torch.softmax(u @ xi.T / math.sqrt(32), 0) @ xi for xi in x])
    assert torch.allclose(probe.pooled(x), by_hand, atol=1e-6, rtol=0)
    attn = probe.attention(x)
    assert attn.shape == (6, 1, 9) and attn.max() > 0.3  # not uniform (1/9)


def test_each_query_pools_its_own_value_slice():
    d, q = 16, 4
    x = tokens(d=d)
    probe = EfficientProbe(d, 2, n_queries=q, d_out=2)
    attn = probe.attention(x)
    v = x @ probe.w_v  # [B, T, 8], slices of width 2
    by_hand = torch.cat([torch.einsum("bt,bts->bs", attn[:, i], v[..., 2 * i:2 * i + 2]) for i in range(q)], -1)
    assert torch.allclose(probe.pooled(x), by_hand, atol=1e-6)


# --- 2. parameter count ------------------------------------------------------------------------------

@pytest.mark.parametrize(("d", "q", "d_out", "c"), [(64, 32, 1, 2), (64, 8, 2, 5), (48, 3, 4, 10), (32, 1, 1, 3)])
def test_parameter_count_matches_formula(d, q, d_out, c):
    width = d // d_out
    probe = EfficientProbe(d, c, n_queries=q, d_out=d_out)
    assert probe.n_parameters == q * d + d * width + width * c + c
    assert sum(b.numel() for b in probe.buffers() if b.is_floating_point()) == 2 * width  # BN stats only


def test_mha_baseline_parameter_count():
    d, q, c = 64, 2, 3
    assert AttentionProbe(d, c, n_queries=q, n_heads=8).n_parameters == q * d + 4 * d * d + 4 * d + d * c + c


# --- 3. padding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: EfficientProbe(16, 3, n_queries=4, d_out=2),
                                  lambda: AttentionProbe(16, 3, n_queries=2, n_heads=4)])
def test_padded_batch_equals_items_alone(make):
    probe = make().eval()  # BatchNorm on running statistics
    with torch.no_grad():
        probe.head[0].running_mean.normal_(generator=torch.Generator().manual_seed(1))
    x, mask, lengths = ragged()
    logits, attn = probe(x, mask, return_attention=True)
    assert bool(torch.isfinite(logits).all())
    assert bool((attn[~mask[:, None, :].expand_as(attn)] == 0).all())  # exactly zero on padding
    for i, n in enumerate(lengths.tolist()):
        alone, alone_attn = probe(x[i:i + 1, :n], return_attention=True)
        assert torch.allclose(logits[i], alone[0], atol=1e-5)
        assert torch.allclose(attn[i, :, :n], alone_attn[0], atol=1e-6)


def test_mha_baseline_matches_torch_multihead_attention():
    d, h, q = 16, 4, 3
    probe = AttentionProbe(d, 2, n_queries=q, n_heads=h)
    ref = torch.nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(probe.w_qkv.T)
        ref.in_proj_bias.copy_(probe.b_qkv)
        ref.out_proj.weight.copy_(probe.w_o.T)
        ref.out_proj.bias.copy_(probe.b_o)
    x, mask, _ = ragged(d=d)
    out, weights = ref(probe.queries.expand(x.shape[0], -1, -1), x, x, key_padding_mask=~mask)
    assert torch.allclose(probe.pooled(x, mask), out.mean(1), atol=1e-5)
    assert torch.allclose(probe.attention(x, mask), weights, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: EfficientProbe(16, 3, n_queries=4), lambda: AttentionProbe(16, 3, 2, 4)])
def test_standardisation_folds_exactly(make):
    probe = make().eval()
    folded = copy.deepcopy(probe)
    x, mask, _ = ragged()
    x[~mask] = 0.0
    mean, scale = torch.linspace(-2, 3, 16), torch.linspace(0.1, 5, 16)
    folded.fold_standardization(mean, scale)
    raw = x * scale + mean
    assert torch.allclose(folded(raw, mask), probe(x, mask), atol=1e-4)
    assert torch.allclose(folded.attention(raw, mask), probe.attention(x, mask), atol=1e-5)


# --- 4. the claim ------------------------------------------------------------------------------------

def test_ep_finds_a_one_token_signal_that_mean_pooling_drowns():
    x, y, position = one_token_task()
    train, test = slice(0, 1500), slice(1500, None)
    mean_pooled = LogisticRegression(max_iter=2000).fit(x[train].mean(1).numpy(), y[train].numpy())
    mean_acc = mean_pooled.score(x[test].mean(1).numpy(), y[test].numpy())
    ep = AttentiveProbe("efficient", n_queries=32, epochs=15, lr=1e-2, progress=False).fit(x[train], y[train])
    ep_acc = ep.score(x[test], y[test])
    mha = AttentionProbe(64, 2, n_queries=1, n_heads=8)
    print(f"\nheld-out accuracy: EP {ep_acc:.3f} ({ep.n_parameters} params), mean-pooled logistic {mean_acc:.3f}; "
          f"MHA baseline {mha.n_parameters} params")
    assert ep_acc >= 0.95
    assert mean_acc <= 0.85 and ep_acc - mean_acc >= 0.15
    assert ep.n_parameters < mha.n_parameters
    # the attention maps say where: the token most attended to is the signal token for most items
    read = ep.attention(x[test]).amax(1).argmax(-1)
    assert float((read == position[test]).float().mean()) >= 0.8


# --- the estimator ------------------------------------------------------------------------------------

def small_fit(kind="efficient", labels=(-3, 7), seed=0, **kw):
    x, mask, _ = ragged(n=6)
    x = torch.cat([x] * 4)
    mask = torch.cat([mask] * 4)
    y = torch.tensor(labels)[torch.arange(24) % len(labels)]
    probe = AttentiveProbe(kind, n_queries=4, n_heads=4, epochs=3, batch_size=8, seed=seed, progress=False, **kw)
    return probe.fit(x, y, mask), x, mask, y


def test_labels_map_through_classes_and_probe_is_a_frozen_callable():
    probe, x, mask, y = small_fit(labels=(-3, 7, 10))
    assert probe.classes_.tolist() == [-3, 7, 10]
    assert set(probe.predict(x, mask).tolist()) <= {-3, 7, 10}
    proba = probe.predict_proba(x, mask)
    assert proba.shape == (24, 3) and torch.allclose(proba.sum(-1), torch.ones(24))
    assert 0.0 <= probe.score(x, y, mask) <= 1.0
    assert not any(p.requires_grad for p in probe.module_.parameters()) and not probe.module_.training
    xg = x.clone().requires_grad_(True)
    logits = probe(xg, mask)
    assert torch.allclose(logits, probe.decision_function(x, mask))
    logits[:, 0].sum().backward()  # gradients reach the activations, none are needed in the probe
    assert xg.grad is not None and bool((xg.grad[~mask] == 0).all())


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, x, mask, _ = small_fit(seed=3, early_stopping=2)
    b, _, _, _ = small_fit(seed=3, early_stopping=2)
    c, _, _, _ = small_fit(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.decision_function(x, mask), b.decision_function(x, mask))
    assert not torch.equal(a.decision_function(x, mask), c.decision_function(x, mask))


# --- 5. bad input ------------------------------------------------------------------------------------

def test_bad_input_raises_mechkit_error():
    x, y = tokens(n=8, d=16), torch.tensor([0, 1] * 4)
    probe = AttentiveProbe(n_queries=4, epochs=1, progress=False)
    cases = {
        "single class": lambda: probe.fit(x, torch.zeros(8)),
        "NaN": lambda: probe.fit(torch.where(torch.arange(16) == 3, float("nan"), x), y),
        "label count": lambda: probe.fit(x, y[:5]),
        "mask shape": lambda: probe.fit(x, y, torch.ones(8, 5, dtype=torch.bool)),
        "empty item": lambda: probe.fit(x, y, torch.arange(9)[None].expand(8, 9) < torch.arange(8)[:, None]),
        "2-D X": lambda: probe.fit(x[:, 0], y),
        "not divisible": lambda: AttentiveProbe(n_queries=32, progress=False).fit(tokens(n=8, d=60), y),
        "kind": lambda: AttentiveProbe("conv", progress=False).fit(x, y),
        "not fitted": lambda: AttentiveProbe().predict(x),
        "module D": lambda: EfficientProbe(48, 2, n_queries=32),
        "heads": lambda: AttentionProbe(30, 2, n_heads=8),
    }
    for name, call in cases.items():
        with pytest.raises(MechkitError):
            call()
            pytest.fail(name)
    probe.fit(x, y)
    with pytest.raises(MechkitError, match="width"):
        probe.predict(tokens(n=2, d=8))


# --- 6. save / load ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["efficient", "mha"])
def test_save_load_round_trip(tmp_path, kind):
    probe, x, mask, _ = small_fit(kind, labels=(-3, 7, 10))
    probe.save(tmp_path / "p")
    loaded = AttentiveProbe.load(tmp_path / "p")
    assert loaded.get_params() == probe.get_params() and torch.equal(loaded.classes_, probe.classes_)
    assert torch.equal(loaded.predict(x, mask), probe.predict(x, mask))
    assert torch.equal(loaded.decision_function(x, mask), probe.decision_function(x, mask))
    assert torch.equal(loaded.attention(x, mask), probe.attention(x, mask))
    assert loaded.n_parameters == probe.n_parameters and loaded.loss_curve_ == probe.loss_curve_
    (tmp_path / "p" / "probe.safetensors").write_bytes(b"broken")
    with pytest.raises(MechkitError):
        AttentiveProbe.load(tmp_path / "p")
