"""Attentive probes over token sequences: Efficient Probing (EP, Psomas et al.) and a multi-head baseline.

:class:`EfficientProbe` (METHODS §1.2) pools ``x [B, T, D]`` with ``Q`` learned queries that read the
raw tokens as keys (no query, key or output projection): ``A = softmax_T(U xᵀ / √D)``, one value
projection ``W_V [D, D/d_out]`` whose output is split into ``Q`` contiguous slices, each pooled by its
own query and concatenated, then ``BatchNorm1d(affine=False) → Linear``. :class:`AttentionProbe` is the
baseline: learned queries through full Q/K/V/O multi-head attention, the same head.

:class:`AttentiveProbe` is the scikit-learn half (``fit`` / ``predict`` / ``predict_proba`` / ``score``).
Its fitted module ``module_`` is frozen (no parameter needs a gradient) and reads raw activations:
the estimator standardises channels for training (statistics over real tokens, so the learning
rate does not depend on the model's activation scale and rogue channels do not dominate the
attention logits) and then folds that standardisation exactly into the first projections, so
``probe(x, mask)`` is one module call with no preprocessing. Padding (``mask`` False) gets exactly
zero attention and never enters a statistic.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError
from mechkit.probing.artifact import load_artifact, save_artifact
from mechkit.probing.checks import as_features, as_labels, encode_labels

KIND = "attentive"
KINDS = ("efficient", "mha")


def as_mask(mask: Any, x: Tensor) -> Tensor | None:
    """A bool ``[B, T]`` real-token mask for ``x [B, T, D]`` (``None`` = every token real)."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=x.device)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise MechkitError("mask must be bool (True = real token) or 0/1 integers")
        mask = mask.bool()
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise MechkitError(f"mask has shape {tuple(mask.shape)} but the tokens are {tuple(x.shape[:2])} "
                           "[batch, tokens]; give one flag per token")
    empty = (~mask.any(1)).nonzero().flatten()
    if empty.numel():
        raise MechkitError(f"rows {empty[:5].tolist()} of the mask hold no real token; drop those items")
    return mask


def masked_softmax(logits: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Softmax over the token axis ``dim`` of ``logits [B, ...]``; padding gets weight exactly 0."""
    if mask is not None:
        shape = [1] * logits.ndim
        shape[0], shape[dim] = mask.shape
        logits = logits.masked_fill(~mask.view(shape), float("-inf"))
    return torch.softmax(logits, dim=dim)


def efficient_pool(x: Tensor, queries: Tensor, w_v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """EP pooling: ``(o [B, D'], A [B, Q, T])`` with keys = raw tokens and query q reading slice q of ``x W_V``."""
    n_queries, d = queries.shape
    attn = masked_softmax(x @ queries.T / math.sqrt(d), mask, dim=1)  # [B, T, Q]: tokens-major is faster here
    v = (x @ w_v).unflatten(-1, (n_queries, w_v.shape[1] // n_queries))  # [B, T, Q, D'/Q]
    return (attn[..., None] * v).sum(1).flatten(1), attn.transpose(1, 2)


def _head(width: int, n_classes: int, generator: torch.Generator) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) → Linear, the linear layer initialised as MAE's probe head."""
    linear = nn.utils.skip_init(nn.Linear, width, n_classes)  # no draw from the global RNG
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
        linear.bias.zero_()
    return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)


def _queries(n_queries: int, d: int, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(n_queries, d, generator=generator) * 0.02)


class _PoolingProbe(nn.Module):
    """Shared ``forward``: pool the tokens, then the normalised linear head."""

    d_model: int

    def pool(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check(self, x: Tensor, mask: Any) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MechkitError(f"{type(self).__name__} reads tokens [batch, tokens, {self.d_model}], got {shape}")
        return x.to(self.queries.dtype), as_mask(mask, x)

    def forward(self, x: Tensor, mask: Any = None, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B, C]`` (and the attention maps ``[B, Q, T]`` with ``return_attention=True``)."""
        pooled, attn = self.pool(*self._check(x, mask))
        logits = self.head(pooled)
        return (logits, attn) if return_attention else logits

    def attention(self, x: Tensor, mask: Any = None) -> Tensor:
        """Which tokens each query reads: ``[B, Q, T]``, rows sum to 1, zero on padding."""
        return self.pool(*self._check(x, mask))[1]

    def pooled(self, x: Tensor, mask: Any = None) -> Tensor:
        """The pooled vector ``[B, width]`` the head reads."""
        return self.pool(*self._check(x, mask))[0]

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class EfficientProbe(_PoolingProbe):
    """EP: ``Q·D + D·D' + D'·C + C`` parameters, ``D' = D / d_out``; ``D`` divisible by ``d_out·Q``."""

    def __init__(self, d_model: int, n_classes: int, n_queries: int = 32, d_out: int = 1, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if min(d_model, n_classes, n_queries, d_out) < 1:
            raise MechkitError("d_model, n_classes, n_queries and d_out must all be positive")
        if d_model % (d_out * n_queries):
            raise MechkitError(f"D={d_model} is not divisible by d_out·Q = {d_out}·{n_queries}; pick n_queries "
                               f"and d_out whose product divides {d_model}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.d_model, self.n_queries, self.d_out = d_model, n_queries, d_out
        width = d_model // d_out
        self.queries = _queries(n_queries, d_model, g)
        bound = 1 / math.sqrt(d_model)  # nn.Linear's default range, drawn from our generator
        self.w_v = nn.Parameter(torch.empty(d_model, width).uniform_(-bound, bound, generator=g))
        self.head = _head(width, n_classes, g)

    def pool(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return efficient_pool(x, self.queries, self.w_v, mask)

    @torch.no_grad()
    def fold_standardization(self, mean: Tensor, scale: Tensor) -> None:
        """Make ``self(x)`` equal the old ``self((x − mean) / scale)`` (eval mode): the per-query shift of
        the attention logits cancels in the softmax, the value shift moves into BatchNorm's running mean."""
        shift = -(mean / scale) @ self.w_v
        self.queries.div_(scale)
        self.w_v.div_(scale[:, None])
        self.head[0].running_mean.sub_(shift)


class AttentionProbe(_PoolingProbe):
    """Baseline: ``Q`` learned queries through multi-head attention with full Q/K/V/O projections
    (biases included, as ``nn.MultiheadAttention``), the query outputs averaged, then the EP head.
    Attention maps are averaged over heads."""

    def __init__(self, d_model: int, n_classes: int, n_queries: int = 1, n_heads: int = 8, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if min(d_model, n_classes, n_queries, n_heads) < 1:
            raise MechkitError("d_model, n_classes, n_queries and n_heads must all be positive")
        if d_model % n_heads:
            raise MechkitError(f"D={d_model} is not divisible by n_heads={n_heads}; pick a head count dividing it")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.d_model, self.n_queries, self.n_heads = d_model, n_queries, n_heads
        self.queries = _queries(n_queries, d_model, g)
        # x @ w + b convention; xavier weights and zero biases, as nn.MultiheadAttention
        self.w_qkv = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * d_model, d_model), generator=g).T.clone())
        self.b_qkv = nn.Parameter(torch.zeros(3 * d_model))
        bound = 1 / math.sqrt(d_model)
        self.w_o = nn.Parameter(torch.empty(d_model, d_model).uniform_(-bound, bound, generator=g))
        self.b_o = nn.Parameter(torch.zeros(d_model))
        self.head = _head(d_model, n_classes, g)

    def pool(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        d, h = self.d_model, self.n_heads
        w, b = self.w_qkv, self.b_qkv
        q = (self.queries @ w[:, :d] + b[:d]).unflatten(-1, (h, d // h))  # [Q, H, d_h]
        k = (x @ w[:, d:2 * d] + b[d:2 * d]).unflatten(-1, (h, d // h))  # [B, T, H, d_h]
        v = (x @ w[:, 2 * d:] + b[2 * d:]).unflatten(-1, (h, d // h))
        attn = masked_softmax(torch.einsum("qhe,bthe->bhqt", q, k) / math.sqrt(d // h), mask, dim=-1)
        z = torch.einsum("bhqt,bthe->bqhe", attn, v).flatten(2) @ self.w_o + self.b_o
        return z.mean(1), attn.mean(1)

    @torch.no_grad()
    def fold_standardization(self, mean: Tensor, scale: Tensor) -> None:
        """Make ``self(x)`` equal the old ``self((x − mean) / scale)``: keys and values are affine in x."""
        d = self.d_model
        kv = self.w_qkv[:, d:]
        self.b_qkv[d:].sub_((mean / scale) @ kv)
        kv.div_(scale[:, None])


def build_module(kind: str, d_model: int, n_classes: int, params: dict[str, Any],
                 generator: torch.Generator | None = None) -> _PoolingProbe:
    """The probe module of ``kind`` with the estimator's ``params`` (n_queries, d_out, n_heads)."""
    if kind == "efficient":
        return EfficientProbe(d_model, n_classes, params["n_queries"], params["d_out"], generator=generator)
    if kind == "mha":
        return AttentionProbe(d_model, n_classes, params["n_queries"], params["n_heads"], generator=generator)
    raise MechkitError(f"unknown attentive probe kind {kind!r}; choose one of {list(KINDS)}")


def _standardization(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and scale over the real tokens (constant channels keep scale 1)."""
    tokens = (x if mask is None else x[mask]).reshape(-1, x.shape[-1]).double()
    std = tokens.std(0, correction=0)
    return tokens.mean(0).float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()


def _batches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; a final batch of one joins the previous (BatchNorm needs two rows)."""
    chunks = list(torch.randperm(n, generator=generator).split(size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def _split(n: int, est: AttentiveProbe, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Training rows and (with early stopping) held-out validation rows."""
    order = torch.randperm(n, generator=generator)
    if est.early_stopping is None:
        return order, None
    n_val = max(1, round(est.validation_fraction * n))
    if n - n_val < 2:
        raise MechkitError(f"{n} items leave {n - n_val} for training after the validation split; give more items "
                           "or set early_stopping=None")
    return order[n_val:], order[:n_val]


def _loss(module: _PoolingProbe, x: Tensor, mask: Tensor | None, target: Tensor, rows: Tensor) -> Tensor:
    return nn.functional.cross_entropy(module(x[rows], None if mask is None else mask[rows]), target[rows])


def _train(module: _PoolingProbe, x: Tensor, mask: Tensor | None, target: Tensor, est: AttentiveProbe,
           generator: torch.Generator) -> tuple[list[float], int]:
    """AdamW with a cosine learning-rate decay; returns ``(loss per epoch, epochs run)``. With early
    stopping the weights of the best validation epoch are restored."""
    from tqdm.auto import tqdm

    train, val = _split(x.shape[0], est, generator)
    opt = torch.optim.AdamW(module.parameters(), lr=est.lr, weight_decay=est.weight_decay)
    per_epoch = -(-len(train) // est.batch_size) - (len(train) % est.batch_size == 1 and len(train) > 1)
    steps = est.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    curve, best, best_loss, wait = [], None, math.inf, 0
    with torch.enable_grad(), tqdm(range(est.epochs), desc=f"{est.kind} probe", disable=not est.progress,
                                   leave=False) as bar:
        for _ in bar:
            module.train()
            total = 0.0
            for idx in _batches(len(train), est.batch_size, generator):
                loss = _loss(module, x, mask, target, train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                total += loss.item() * len(idx)
            curve.append(total / len(train))
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
            if val is None:
                continue
            with torch.no_grad():
                val_loss = float(_loss(module.eval(), x, mask, target, val))
            if val_loss < best_loss:
                best, best_loss, wait = copy.deepcopy(module.state_dict()), val_loss, 0
            elif (wait := wait + 1) >= est.early_stopping:
                break
    if best is not None:
        module.load_state_dict(best)
    return curve, len(curve)


class AttentiveProbe:
    """An attentive probe over token sequences with the scikit-learn estimator API.

    ``kind="efficient"`` is EP (``n_queries`` queries, value width ``D / d_out``); ``kind="mha"`` the
    multi-head baseline (``n_queries`` queries, ``n_heads`` heads; ``d_out`` unused). Training: AdamW
    (``lr``, ``weight_decay``) with cosine decay for ``epochs`` over shuffled batches of ``batch_size``;
    ``early_stopping=k`` holds out ``validation_fraction`` of the items and stops after ``k`` epochs
    without a lower validation loss (keeping the best epoch). ``standardize`` trains on per-channel
    standardised tokens and folds that into the fitted module. ``seed`` drives initialisation,
    shuffling and the validation split through one ``torch.Generator``; the global RNG is untouched.

    Fitted state: ``module_`` (the frozen module, eval mode), ``classes_``, ``n_features_in_``,
    ``n_iter_`` (epochs run), ``loss_curve_`` (training loss per epoch).
    """

    def __init__(self, kind: str = "efficient", n_queries: int = 32, d_out: int = 1, *,  # noqa: PLR0913 (hyperparameters)
                 n_heads: int = 8, epochs: int = 30, lr: float = 3e-3, weight_decay: float = 0.01,
                 batch_size: int = 64, standardize: bool = True, early_stopping: int | None = None,
                 validation_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> None:
        self.kind, self.n_queries, self.d_out, self.n_heads = kind, n_queries, d_out, n_heads
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.standardize, self.early_stopping = standardize, early_stopping
        self.validation_fraction = validation_fraction
        self.seed, self.progress = seed, progress

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _check_params(self) -> None:
        if self.kind not in KINDS:
            raise MechkitError(f"unknown attentive probe kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise MechkitError(f"need epochs ≥ 1, batch_size ≥ 2, lr > 0 and weight_decay ≥ 0; got "
                               f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}, "
                               f"weight_decay={self.weight_decay}")
        if self.early_stopping is not None and (self.early_stopping < 1 or not 0 < self.validation_fraction < 1):
            raise MechkitError("early_stopping is a patience ≥ 1 (or None) and validation_fraction lies in (0, 1)")

    def fit(self, X: Any, y: Any, mask: Any = None) -> AttentiveProbe:
        """Train on tokens ``X [N, T, D]`` with labels ``y [N]`` (any ints, ≥ 2 classes) and real-token ``mask``."""
        self._check_params()
        x = as_features(X, ndim=3)
        m = as_mask(mask, x)
        classes, target = encode_labels(as_labels(y, x.shape[0]))
        g = torch.Generator().manual_seed(self.seed)
        module = build_module(self.kind, x.shape[-1], len(classes), self.get_params(), g)
        if self.standardize:
            mean, scale = _standardization(x, m)
            x = (x - mean) / scale
        self.loss_curve_, self.n_iter_ = _train(module, x, m, target, self, g)
        if self.standardize:
            module.fold_standardization(mean, scale)
        self._set_fitted(module, classes)
        return self

    def _set_fitted(self, module: _PoolingProbe, classes: Tensor) -> None:
        self.module_ = module.eval().requires_grad_(False)
        self.classes_, self.n_features_in_ = classes, module.d_model

    def _fitted(self) -> _PoolingProbe:
        if not hasattr(self, "module_"):
            raise MechkitError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        return self.module_

    def __call__(self, x: Tensor, mask: Any = None) -> Tensor:
        """Logits ``[B, C]`` of the frozen module; gradients flow to ``x`` only if it asks for them."""
        return self._fitted()(x, mask)

    def _run(self, X: Any, mask: Any, attention: bool = False, chunk: int = 1024) -> Tensor:
        module = self._fitted()
        x = as_features(X, ndim=3)
        if x.shape[-1] != self.n_features_in_:
            raise MechkitError(f"the probe was fitted on width {self.n_features_in_}, "
                               f"got tokens of width {x.shape[-1]}")
        m = as_mask(mask, x)
        run = module.attention if attention else module
        with torch.no_grad():
            return torch.cat([run(x[i:i + chunk], None if m is None else m[i:i + chunk])
                              for i in range(0, x.shape[0], chunk)])

    def decision_function(self, X: Any, mask: Any = None) -> Tensor:
        return self._run(X, mask)

    def predict(self, X: Any, mask: Any = None) -> Tensor:
        index = self._run(X, mask).argmax(-1)
        return self.classes_[index]

    def predict_proba(self, X: Any, mask: Any = None) -> Tensor:
        return torch.softmax(self._run(X, mask), -1)

    def score(self, X: Any, y: Any, mask: Any = None) -> float:
        """Accuracy on ``(X, y)``."""
        pred = self.predict(X, mask)
        return float((pred == as_labels(y, pred.shape[0], fitting=False)).float().mean())

    def attention(self, X: Any, mask: Any = None) -> Tensor:
        """Attention maps ``[N, Q, T]``: which tokens each query reads (zero on padding)."""
        return self._run(X, mask, attention=True)

    @property
    def n_parameters(self) -> int:
        return self._fitted().n_parameters

    def save(self, folder: str | Path) -> Path:
        """``probe.safetensors`` (module state + classes) and ``probe.json`` (hyperparameters, history)."""
        module = self._fitted()
        tensors = {f"module.{k}": v for k, v in module.state_dict().items()} | {"classes": self.classes_}
        meta = {"params": self.get_params(), "d_model": self.n_features_in_, "n_iter": self.n_iter_,
                "loss_curve": self.loss_curve_}
        return save_artifact(folder, KIND, tensors, meta)

    @classmethod
    def load(cls, folder: str | Path) -> AttentiveProbe:
        _, tensors, meta = load_artifact(folder, KIND)
        est = cls(**meta["params"])
        classes = tensors.pop("classes")
        module = build_module(est.kind, meta["d_model"], len(classes), est.get_params())
        module.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items()})
        est._set_fitted(module, classes)
        est.n_iter_, est.loss_curve_ = meta["n_iter"], meta["loss_curve"]
        return est
