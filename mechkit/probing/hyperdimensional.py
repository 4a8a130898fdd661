"""Hyperdimensional probe (Bronzini et al.): decode vector-symbolic concepts from hidden states.

Concepts are random MAP hypervectors in {−1, +1}^D (through torch-hd; binding is the elementwise
product and is its own inverse, bundling is a sum then the sign). For an analogy A:B :: C:D the
target is ``T = sign(A⊙B + C⊙D)``. An item's hidden states (last token, upper half of the layers)
are compressed by k-means over its layer vectors — the sum of the k centroids — and a shallow
encoder learns to map that vector to T (``BCE + 0.1·MSE``). Decoding unbinds the prediction with
the known context (``u = ŷ ⊙ C``) and cleans it up against the codebook: the nearest entry is the
decoded concept, entries with cosine ≥ 0.1 count as present.

    book = Codebook(concept_names, dim=4096, seed=0)
    e = compress_layers(hidden[:, n_layers // 2:], k=5)           # [items, d]
    probe = HyperdimensionalProbe(seed=0).fit(e, book.analogy_targets(quads))
    decoded = decode(probe.predict(e), book, contexts=[[c] for _, _, c, _ in quads])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError
from mechkit.probing.artifact import load_artifact, save_artifact
from mechkit.probing.checks import as_features

KIND = "hyperdimensional"


class Codebook:
    """One random bipolar (MAP) hypervector per concept name, reproducible from ``seed``."""

    def __init__(self, names: Sequence[str], dim: int = 4096, seed: int = 0) -> None:
        import torchhd

        names = list(dict.fromkeys(names))
        if len(names) < 2:
            raise MechkitError("a codebook needs at least two concepts")
        g = torch.Generator().manual_seed(seed)
        self.names, self.dim, self.seed = names, dim, seed
        self.vectors = torchhd.random(len(names), dim, "MAP", generator=g).as_subclass(Tensor)
        self._ties = torchhd.random(1, dim, "MAP", generator=g).as_subclass(Tensor)[0]  # breaks sign(0)
        self._index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._index:
            from mechkit.sites import nearest_names

            raise MechkitError(f"{name!r} is not in the codebook; {nearest_names(name, self.names)}")
        return self.vectors[self._index[name]]

    @staticmethod
    def bind(*vectors: Tensor) -> Tensor:
        out = vectors[0]
        for v in vectors[1:]:
            out = out * v
        return out

    def bundle(self, vectors: Sequence[Tensor]) -> Tensor:
        """Sum then sign; ties (an even number of disagreeing members) take a fixed random sign."""
        total = torch.stack(list(vectors)).sum(0)
        return torch.where(total == 0, self._ties, total.sign())

    def target(self, pairs: Sequence[tuple[str, str]] = (), singles: Sequence[str] = ()) -> Tensor:
        """``sign(Σ bind(a, b) + Σ single)`` for the bound pairs and lone concepts of one item."""
        parts = [self.bind(self[a], self[b]) for a, b in pairs] + [self[s] for s in singles]
        if not parts:
            raise MechkitError("a target needs at least one pair or concept")
        return self.bundle(parts)

    def analogy_targets(self, quads: Sequence[tuple[str, str, str, str]]) -> Tensor:
        """``T = sign(A⊙B + C⊙D)`` for each analogy ``A:B :: C:D``: ``[items, D]``."""
        return torch.stack([self.target([(a, b), (c, d)]) for a, b, c, d in quads])

    def similarities(self, u: Tensor) -> Tensor:
        """Cosine of ``u [..., D]`` with every entry: ``[..., concepts]``."""
        return torch.nn.functional.normalize(u.float(), dim=-1) @ (self.vectors / self.dim ** 0.5).T


def compress_layers(hidden: Tensor, k: int = 5, seed: int = 0) -> Tensor:
    """Per item, k-means (scikit-learn, fixed seed) over its layer vectors ``hidden [items, layers, d]``;
    returns the sum of the k centroids ``[items, d]`` (with k ≥ layers: the sum of the layers)."""
    from sklearn.cluster import KMeans

    hidden = as_features(hidden, ndim=3, name="hidden")
    if k < 1:
        raise MechkitError(f"k={k}: k-means needs at least one cluster")
    if k >= hidden.shape[1]:
        return hidden.sum(1)
    out = torch.empty(hidden.shape[0], hidden.shape[2])
    for i, layers in enumerate(hidden.double().numpy()):
        centres = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(layers).cluster_centers_
        out[i] = torch.from_numpy(centres.sum(0)).float()
    return out


class HyperdimensionalProbe:
    """Shallow encoder ``d → D`` (Linear–GELU–Dropout(0.5)–Linear) trained on bipolar targets."""

    def __init__(self, hidden: int = 1024, *, epochs: int = 60, lr: float = 1e-3, batch_size: int = 64,
                 weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> None:
        self.hidden, self.epochs, self.lr, self.batch_size = hidden, epochs, lr, batch_size
        self.weight_decay, self.seed, self.progress = weight_decay, seed, progress

    def _build(self, d: int, dim: int, generator: torch.Generator) -> nn.Sequential:
        layers = nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Dropout(0.5), nn.Linear(self.hidden, dim))
        with torch.no_grad():
            for layer in (layers[0], layers[3]):
                bound = layer.in_features ** -0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        return layers

    def fit(self, E: Any, targets: Any) -> HyperdimensionalProbe:
        from tqdm.auto import tqdm

        e = as_features(E, name="E")
        t = as_features(targets, name="targets")
        if len(e) != len(t):
            raise MechkitError(f"{len(e)} compressed states but {len(t)} targets; give one target per item")
        if not bool((t.abs() == 1).all()):
            raise MechkitError("targets must be bipolar (±1) hypervectors, e.g. Codebook.analogy_targets")
        g = torch.Generator().manual_seed(self.seed)
        self.mean_, self.scale_ = e.mean(0), e.std(0).clamp_min(1e-6)
        self.module_ = self._build(e.shape[1], t.shape[1], g)
        opt = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        x = (e - self.mean_) / self.scale_
        self.module_.train()
        for _ in tqdm(range(self.epochs), desc="hyperdimensional probe", disable=not self.progress, leave=False):
            for rows in torch.randperm(len(x), generator=g).split(self.batch_size):
                pred = self._forward_train(x[rows], g)
                loss = (nn.functional.binary_cross_entropy_with_logits(pred, (t[rows] + 1) / 2)
                        + 0.1 * nn.functional.mse_loss(pred, t[rows]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.module_.eval().requires_grad_(False)
        return self

    def _forward_train(self, x: Tensor, g: torch.Generator) -> Tensor:
        first, act, dropout, last = self.module_
        h = act(first(x))
        keep = (torch.rand(h.shape, generator=g) >= dropout.p).to(h.dtype) / (1 - dropout.p)  # seeded dropout
        return last(h * keep)

    def decision_function(self, E: Any) -> Tensor:
        if not hasattr(self, "module_"):
            raise MechkitError("this HyperdimensionalProbe is not fitted yet; call fit(E, targets) first")
        e = as_features(E, name="E")
        if e.shape[1] != self.mean_.shape[0]:
            raise MechkitError(f"the probe reads width {self.mean_.shape[0]}, got {e.shape[1]}")
        return self.module_((e - self.mean_) / self.scale_)

    def predict(self, E: Any) -> Tensor:
        """``ŷ = sign(pred)`` (zeros, vanishingly rare, become +1)."""
        pred = self.decision_function(E)
        return torch.where(pred >= 0, 1.0, -1.0)

    def save(self, folder: str | Path) -> Path:
        tensors = {f"module.{k}": v for k, v in self.module_.state_dict().items()}
        tensors.update(mean=self.mean_, scale=self.scale_)
        params = {k: v for k, v in vars(self).items() if not k.endswith("_")}
        return save_artifact(folder, KIND, tensors, params)

    @classmethod
    def load(cls, folder: str | Path) -> HyperdimensionalProbe:
        _, t, params = load_artifact(folder, KIND)
        probe = cls(**params)
        probe.mean_, probe.scale_ = t["mean"], t["scale"]
        state = {k[len("module."):]: v for k, v in t.items() if k.startswith("module.")}
        probe.module_ = probe._build(probe.mean_.shape[0], state["3.weight"].shape[0], torch.Generator())
        probe.module_.load_state_dict(state)
        probe.module_.eval().requires_grad_(False)
        return probe


@dataclass(frozen=True)
class Decoded:
    """One item's cleanup: the nearest concepts with their cosines, and those above the threshold."""

    top: list[tuple[str, float]]
    present: list[str]

    @property
    def best(self) -> str:
        return self.top[0][0]


def decode(predictions: Tensor, codebook: Codebook, contexts: Sequence[Sequence[str]] = (), *,
           threshold: float = 0.1, top: int = 5) -> list[Decoded]:
    """Unbind each prediction with its context concepts and clean it up against the codebook."""
    if contexts and len(contexts) != len(predictions):
        raise MechkitError(f"{len(predictions)} predictions but {len(contexts)} contexts; give one per item")
    out = []
    for i, y_hat in enumerate(predictions):
        context = contexts[i] if contexts else ()
        u = codebook.bind(y_hat, *(codebook[c] for c in context)) if context else y_hat
        sims = codebook.similarities(u)
        for c in context:  # a context concept is known, not decoded
            sims[codebook.names.index(c)] = float("-inf")
        values, index = sims.topk(min(top, len(codebook.names)))
        ranked = [(codebook.names[j], float(v)) for v, j in zip(values, index)]
        out.append(Decoded(ranked, [n for n, v in ranked if v >= threshold]))
    return out


def decoding_accuracy(decoded: Sequence[Decoded], answers: Sequence[str]) -> float:
    """Fraction of items whose top decoded concept is the expected one."""
    if len(decoded) != len(answers):
        raise MechkitError(f"{len(decoded)} decodings but {len(answers)} answers")
    return sum(d.best == a for d, a in zip(decoded, answers)) / max(len(answers), 1)


def compare_with_logit_lens(decoded: Sequence[Decoded], model_predictions: Sequence[str],
                            answers: Sequence[str]) -> dict[str, float]:
    """Per-item agreement of the probe's decoding and the model's own output with the answer:
    accuracy of each, and how often the probe is right where the model is wrong (and vice versa)."""
    if not len(decoded) == len(model_predictions) == len(answers):
        raise MechkitError("decoded, model_predictions and answers must have one entry per item")
    probe_ok = [d.best == a for d, a in zip(decoded, answers)]
    model_ok = [p.strip() == a.strip() for p, a in zip(model_predictions, answers)]
    n = max(len(answers), 1)
    return {"probe_accuracy": sum(probe_ok) / n, "model_accuracy": sum(model_ok) / n,
            "probe_only": sum(p and not m for p, m in zip(probe_ok, model_ok)) / n,
            "model_only": sum(m and not p for p, m in zip(probe_ok, model_ok)) / n}
