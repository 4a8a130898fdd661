"""Hyperdimensional probe: MAP algebra, k-means compression, and decoding of analogy targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.probing.hyperdimensional import (
    Codebook,
    HyperdimensionalProbe,
    compare_with_logit_lens,
    compress_layers,
    decode,
    decoding_accuracy,
)

pytest.importorskip("torchhd")
pytest.importorskip("sklearn")
COUNTRIES = [f"country{i}" for i in range(10)]
CAPITALS = [f"capital{i}" for i in range(10)]


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def test_map_algebra():
    book = Codebook(COUNTRIES + CAPITALS, dim=4096, seed=0)
    a, b, c = book["country0"], book["capital0"], book["country1"]
    bound = book.bind(a, b)
    assert torch.equal(book.bind(bound, b), a)  # binding is its own inverse, exactly
    assert abs(cos(bound, a)) < 0.06 and abs(cos(bound, b)) < 0.06  # bound ⟂ its factors
    bundle = book.bundle([a, b, c])
    assert all(cos(bundle, v) > 0.4 for v in (a, b, c))
    noisy = bundle * torch.where(torch.rand(4096, generator=torch.Generator().manual_seed(1)) < 0.15, -1.0, 1.0)
    names = [d.best for d in decode(noisy[None], book, top=3)]
    assert names[0] in {"country0", "capital0", "country1"}
    t = book.analogy_targets([("country0", "capital0", "country1", "capital1")])[0]
    assert cos(book.bind(t, book["country1"]), book["capital1"]) > 0.4  # unbinding C leaves D
    assert torch.equal(Codebook(COUNTRIES, dim=64, seed=3).vectors, Codebook(COUNTRIES, dim=64, seed=3).vectors)


def test_compression_is_k_means_over_layers():
    from sklearn.cluster import KMeans

    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compress_layers(hidden, k=6), hidden.sum(1))
    e = compress_layers(hidden, k=2, seed=5)
    torch.testing.assert_close(e, compress_layers(hidden, k=2, seed=5))
    ref = KMeans(n_clusters=2, n_init=3, random_state=5).fit(hidden[1].double().numpy()).cluster_centers_.sum(0)
    np.testing.assert_allclose(e[1].numpy(), ref, rtol=1e-5, atol=1e-5)


def synthetic(quads, reps, g, emb, maps):
    """Hidden states that carry the four concepts of each analogy, through a different map per layer."""
    hidden, names = [], []
    for a, c in quads:
        for _ in range(reps):
            v = emb[a] + emb[10 + a] + emb[c] + emb[10 + c]
            hidden.append(torch.stack([v @ m + 0.3 * torch.randn(v.shape[0], generator=g) for m in maps]))
            names.append((COUNTRIES[a], CAPITALS[a], COUNTRIES[c], CAPITALS[c]))
    return torch.stack(hidden), names


def test_trained_probe_decodes_the_target_and_an_untrained_one_does_not(tmp_path):
    g = torch.Generator().manual_seed(0)
    book = Codebook(COUNTRIES + CAPITALS, dim=1024, seed=0)
    emb = torch.randn(20, 64, generator=g)
    maps = [torch.randn(64, 64, generator=g) / 8 for _ in range(6)]
    quads = [(a, c) for a in range(10) for c in range(10) if a != c]
    order = torch.randperm(len(quads), generator=g).tolist()
    train_h, train_n = synthetic([quads[i] for i in order[:70]], 5, g, emb, maps)
    test_h, test_n = synthetic([quads[i] for i in order[70:]], 2, g, emb, maps)  # analogies never seen
    e_train, e_test = compress_layers(train_h[:, 3:], k=2), compress_layers(test_h[:, 3:], k=2)
    targets = book.analogy_targets(train_n)
    contexts, answers = [[q[2]] for q in test_n], [q[3] for q in test_n]
    probe = HyperdimensionalProbe(hidden=512, epochs=40, progress=False).fit(e_train, targets)
    trained = decoding_accuracy(decode(probe.predict(e_test), book, contexts), answers)
    untrained = HyperdimensionalProbe(hidden=512, epochs=0, progress=False).fit(e_train, targets)
    chance_level = decoding_accuracy(decode(untrained.predict(e_test), book, contexts), answers)
    assert trained >= 0.9 and chance_level <= 0.2, (trained, chance_level)  # chance is 1/19
    decoded = decode(probe.predict(e_test[:3]), book, contexts[:3])
    assert decoded[0].present and decoded[0].top[0][1] >= 0.1
    report = compare_with_logit_lens(decoded, ["capital0", answers[1], "x"], answers[:3])
    assert report["probe_accuracy"] == 1.0 and report["probe_only"] >= 1 / 3
    probe.save(tmp_path / "hd")
    assert torch.equal(HyperdimensionalProbe.load(tmp_path / "hd").predict(e_test), probe.predict(e_test))


def test_bad_input_is_explained():
    book = Codebook(COUNTRIES, dim=64)
    e, t = torch.randn(5, 8), book.analogy_targets([("country0", "country1", "country2", "country3")] * 5)
    with pytest.raises(MechkitError, match="targets"):
        HyperdimensionalProbe(epochs=1, progress=False).fit(e, t[:4])
    with pytest.raises(MechkitError, match="NaN"):
        HyperdimensionalProbe(epochs=1, progress=False).fit(e.index_fill(0, torch.tensor([1]), float("nan")), t)
    with pytest.raises(MechkitError, match="bipolar"):
        HyperdimensionalProbe(epochs=1, progress=False).fit(e, t * 0.5)
    with pytest.raises(MechkitError, match="not in the codebook"):
        decode(t[:1], book, [["countryX"]])
    with pytest.raises(MechkitError, match="shape"):
        compress_layers(torch.randn(4, 8))
    with pytest.raises(MechkitError, match="not fitted"):
        HyperdimensionalProbe().predict(e)
