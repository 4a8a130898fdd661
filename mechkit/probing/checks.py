"""Input checks shared by the probes: clear messages instead of deep tracebacks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError


def as_features(x: Any, *, ndim: int = 2, name: str = "X") -> Tensor:
    """A float tensor of ``ndim`` dims, finite, non-empty (half precision is widened to float32)."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError) as err:
            raise MechkitError(f"{name} must be a tensor (or array) of features, got {type(x).__name__}") from err
    if x.ndim != ndim:
        want = {2: "[n_samples, d]", 3: "[n_samples, tokens, d]"}.get(ndim, f"{ndim} dims")
        raise MechkitError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise MechkitError(f"{name} is empty: no samples to fit or score")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise MechkitError(f"{name} holds NaN or inf in {bad} sample(s); drop or repair them before probing")
    return x


def as_labels(y: Any, n: int, *, fitting: bool = True) -> Tensor:
    """Integer labels ``[n]``; fitting needs at least two classes."""
    y = torch.as_tensor(y)
    if y.ndim != 1:
        raise MechkitError(f"labels must be 1-D [n_samples], got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise MechkitError(f"{n} samples but {y.shape[0]} labels; give one label per sample")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise MechkitError("labels must be class ids (integers); got non-integer values")
        y = y.long()
    if fitting and torch.unique(y).numel() < 2:
        raise MechkitError(f"labels hold a single class ({y[0].item()}); a probe needs at least two classes")
    return y.long()


def encode_labels(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(classes, index)``: sorted class values and each label's position among them."""
    classes = torch.unique(y)
    return classes, torch.searchsorted(classes, y)
