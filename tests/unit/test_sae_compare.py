"""SAE-versus-probe comparison, k-sparse probing and feature absorption on planted tensors: AUROC
equals scikit-learn's, a probe along a decoder row is found and beats the random control, a latent
that is the concept reads it as well as the full probe, and an absorbing latent that takes the
concept over on a known subset gives an absorption rate equal to that subset's share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sklearn.metrics import roc_auc_score

from mechkit.config import ConfigError
from mechkit.errors import MechkitError
from mechkit.results import Result
from mechkit.sae.compare import auroc_columns, compare_with_probes
from mechkit.sae.sparse_probing import feature_absorption, k_sparse_probing

D_IN, D_SAE = 16, 12


def basis_sae(seed: int = 0) -> tuple[StandardSAE, torch.Tensor]:
    """A ReLU SAE whose latents are the projections onto 12 of 16 orthonormal directions, and the basis."""
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(seed)))
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.copy_(q[:, :D_SAE])
        sae.W_dec.copy_(q[:, :D_SAE].T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae, q.T  # rows: the directions


def test_auroc_equals_sklearn():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(300, generator=g) < 0.3
    scores = torch.randint(0, 6, (300, 5), generator=g).float()  # many ties
    scores[:, 0] += 3 * y  # one informative column
    scores[:, 4] = torch.randn(300, generator=g)
    ours = auroc_columns(scores, y, chunk=2)
    for c in range(5):
        assert float(ours[c]) == pytest.approx(roc_auc_score(y.numpy(), scores[:, c].numpy()), abs=1e-12)
    with pytest.raises(MechkitError, match="both positive and negative"):
        auroc_columns(scores, torch.zeros(300, dtype=torch.bool))


def test_compare_with_probes_finds_the_aligned_latent():
    sae, rows = basis_sae()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, D_IN, generator=g)
    labels = {"along": x @ rows[3] > 0.5, "off": x @ rows[14] > 0}  # rows 12–15 are not decoder rows
    noisy = rows[3] + 0.05 * torch.randn(D_IN, generator=g)
    probes = {"along": SimpleNamespace(direction=noisy), "off": SimpleNamespace(directions=rows[14][None])}
    result = compare_with_probes(sae, x, labels, probes, seed=0)
    z = sae.encode(x).detach()
    for i, name in enumerate(result.concepts):
        y = labels[name].numpy()
        score = [roc_auc_score(y, z[:, j].numpy()) for j in range(D_SAE)]
        active = [roc_auc_score(y, (z[:, j] > 0).numpy()) for j in range(D_SAE)]
        assert float(result.auroc[i]) == pytest.approx(max(score), abs=1e-9)
        assert float(result.auroc_active[i]) == pytest.approx(max(active), abs=1e-9)
        assert int(result.best_latent[i]) == max(range(D_SAE), key=score.__getitem__)
    along, off = result.concepts.index("along"), result.concepts.index("off")
    assert int(result.best_latent[along]) == 3 and float(result.auroc[along]) == pytest.approx(1.0)
    assert int(result.cosine_latent[along]) == 3
    assert float(result.max_cosine[along]) == pytest.approx(float((noisy / noisy.norm()) @ rows[3]), abs=1e-5)
    # an aligned probe clears the random control; one orthogonal to every decoder row falls below it
    assert float(result.max_cosine[along]) > result.random_quantile > result.random_mean > 0
    assert float(result.max_cosine[off]) < 1e-5 < result.random_mean
    assert result.random_cosine.shape == (64,)
    other = compare_with_probes(sae, x, labels, probes, seed=1)
    assert other.random_mean != result.random_mean  # the control depends on the seed only
    same = compare_with_probes(sae, x, torch.stack([labels["along"], labels["off"]], 1),
                               torch.stack([noisy, rows[14]]), seed=0)
    assert torch.equal(same.max_cosine, result.max_cosine) and torch.equal(same.auroc, result.auroc)
    assert list(result.to_frame()["above_control"]) == [True, False]
    assert len(result.plot().axes) == 2


def test_compare_bad_input(tmp_path):
    sae, rows = basis_sae()
    x = torch.randn(50, D_IN)
    y = x[:, 0] > 0
    with pytest.raises(MechkitError, match="no probe direction"):
        compare_with_probes(sae, x, {"a": y}, {"b": rows[0]})
    with pytest.raises(MechkitError, match="direction"):
        compare_with_probes(sae, x, y, object())
    with pytest.raises(MechkitError, match="0/1"):
        compare_with_probes(sae, x, x[:, 0], rows[0])
    result = compare_with_probes(sae, x, y, rows[0])
    result.save(tmp_path / "cmp")
    assert Result.load(tmp_path / "cmp").equals(result)


def test_k_sparse_probing_one_latent_is_the_concept():
    sae, rows = basis_sae()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(800, D_IN, generator=g)
    y = x @ rows[5] > 0.2
    result = k_sparse_probing(sae, x, y, ks=(1, 2, 5, 20))
    assert result.ks == [1, 2, 5, D_SAE]  # k beyond d_sae is clipped
    assert int(result.ranking[0]) == 5
    z = sae.encode(x).detach()
    diff = (z[y].mean(0) - z[~y].mean(0)).abs()  # on all items: the same latent leads by far
    assert int(diff.argmax()) == 5
    assert result.baseline_accuracy > 0.95
    assert float(result.accuracy[0]) >= result.baseline_accuracy - 0.02
    assert result.n_train + result.n_test == 800 and result.n_test == 160
    assert list(result.to_frame()["k"]) == result.ks
    assert result.plot() is not None


class Hierarchy:
    """A planted SAE with absorption: latent 0 is the concept (coordinate 0) except on items carrying
    one of 10 token features (coordinates 1–10), where that token's latent fires instead and its
    decoder direction carries ``carry`` × the concept direction (1: cosine 0.71, an absorbing
    latent; 0: none); latents 11–31 read the remaining coordinates."""

    def __init__(self, carry: float = 1.0, d: int = 32):
        self.cfg = SimpleNamespace(d_sae=d)
        self.W_dec = torch.eye(d)
        self.W_dec[1:11, 0] = carry
        self.W_dec = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)

    def encode(self, x):
        has = x[:, 1:11] > 0.75
        z = x.clamp_min(0).clone()
        z[:, 0] = z[:, 0] * ~has.any(1)
        z[:, 1:11] = z[:, 1:11] * has
        return z

    def decode(self, z):
        return z @ self.W_dec


def hierarchy_data(n: int = 3000, seed: int = 4, subset: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.5
    x = 0.2 * torch.randn(n, 32, generator=g)
    x[y, 0] += 2.0
    carried = y & (torch.rand(n, generator=g) < subset)  # the child features occur only with the parent
    token = torch.randint(1, 11, (n,), generator=g)
    x[carried, token[carried]] += 1.5
    return x, y, carried


def test_absorption_rate_is_the_planted_subset():
    x, y, carried = hierarchy_data()
    share = float(carried.sum() / y.sum())
    result = feature_absorption(Hierarchy(), x, y, torch.eye(32)[0])
    assert result.main_latents.tolist() == [0]  # each token latent adds too little F1 to be a main latent
    assert result.absorption_rate == pytest.approx(share, abs=0.06)
    assert result.n_absorbed == result.n_missed  # every item the main latent misses is taken by a token latent
    assert set(result.absorbing_latents.tolist()) <= set(range(1, 11))
    assert int(result.absorbing_counts.sum()) == result.n_absorbed
    assert abs(result.n_positive - 0.2 * int(y.sum())) <= 1  # the held-out positives of a stratified split
    # the same items, but the token latents' decoders do not carry the concept: missed, not absorbed
    plain = feature_absorption(Hierarchy(carry=0.0), x, y, torch.eye(32)[0])
    assert plain.missed_rate == pytest.approx(result.missed_rate) and plain.absorption_rate == 0.0
    # a token latent barely aligned with the probe (cosine 0.01) absorbs only below that threshold
    weak = feature_absorption(Hierarchy(carry=0.01), x, y, torch.eye(32)[0])
    assert weak.missed_rate == pytest.approx(result.missed_rate) and weak.absorption_rate == 0.0
    loose = feature_absorption(Hierarchy(carry=0.01), x, y, torch.eye(32)[0], cos_threshold=0.005)
    assert loose.absorption_rate == pytest.approx(result.absorption_rate)
    # no hierarchy: the main latent fires on every positive
    x2, y2, _ = hierarchy_data(subset=0.0)
    none = feature_absorption(Hierarchy(), x2, y2, SimpleNamespace(direction=torch.eye(32)[0]))
    assert none.missed_rate < 0.01 and none.absorption_rate < 0.01
    frame = result.to_frame()
    assert frame.loc[0, "absorption_rate"] == result.absorption_rate
    assert result.plot() is not None


def test_absorption_with_given_main_latents_and_bad_input():
    x, y, _ = hierarchy_data(n=600)
    # declaring the token latents main as well leaves nothing to absorb
    result = feature_absorption(Hierarchy(), x, y, torch.eye(32)[0], main=list(range(11)))
    assert result.missed_rate < 0.05 and result.absorption_rate < 0.05
    with pytest.raises(MechkitError, match="one concept"):
        feature_absorption(Hierarchy(), x, torch.stack([y, y], 1), torch.eye(32)[0])
    with pytest.raises(MechkitError, match="-d"):
        feature_absorption(Hierarchy(), x, y, torch.ones(5))
    with pytest.raises(ConfigError, match="share"):
        feature_absorption(Hierarchy(), x, y, torch.eye(32)[0], share=0.0)


@pytest.fixture(scope="module")
def facts():
    """facts-lm's last-token activations at a mid layer, a concept (the fact is about a location) and
    an SAE trained on every real token of the same prompts (a few thousand rows)."""
    import mechkit
    from mechkit.sae.train import train_sae
    from mechkit.tasks import TaskSet

    site = "blocks.2.resid_post"
    model = mechkit.load("zoo:facts-lm")
    tasks = TaskSet.from_jsonl("probes/truth_medium.jsonl")
    rows, last = [], []
    for i in range(0, len(tasks.prompts), 50):
        batch = model.tokenize(tasks.prompts[i:i + 50])
        acts = model.run_with_cache(batch, site).cache[site]
        rows.append(acts[batch.attention_mask.bool()])
        last.append(acts[torch.arange(acts.shape[0]), batch.last_positions])
    sae = train_sae(torch.cat(rows), d_sae=128, k=8, tokens=16384, batch_size=128, progress=False)
    located = torch.tensor([item.meta["relation"] == "located" for item in tasks.items])
    return sae, torch.cat(last), located


def test_on_facts_lm_against_sklearn(facts):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sae, x, y = facts
    probe = LogisticRegression(max_iter=2000).fit(x.numpy(), y.numpy())
    direction = torch.tensor(probe.coef_[0], dtype=torch.float32)
    result = compare_with_probes(sae, x, {"located": y}, {"located": direction})
    z = sae.encode(x).detach()
    aurocs = [roc_auc_score(y.numpy(), z[:, j].numpy()) if z[:, j].any() else 0.5 for j in range(z.shape[1])]
    assert float(result.auroc[0]) == pytest.approx(max(aurocs), abs=1e-9)
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    assert float(result.max_cosine[0]) == pytest.approx(float((unit @ direction / direction.norm()).abs().max()),
                                                        abs=1e-5)
    sparse = k_sparse_probing(sae, x, y, ks=(1, 4, 128))
    train, test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=y.numpy())
    zt, yt = z[train], y[train]
    assert int(sparse.ranking[0]) == int((zt[yt].mean(0) - zt[~yt].mean(0)).abs().argmax())
    assert sparse.baseline_accuracy > 0.7  # the concept is linearly readable at this site
    # with every latent the k-sparse probe is a plain probe on the latents: the same as fitting one directly
    dense = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(zt.double().numpy(), yt.numpy())
    assert float(sparse.accuracy[-1]) == pytest.approx(dense.score(z[test].double().numpy(), y[test].numpy()))
