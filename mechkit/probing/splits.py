"""Train/test splits as boolean masks ``[F, n]``: a stratified hold-out or stratified k folds.

``split`` is a float (the training fraction of one stratified shuffle split, default 0.6) or an
int k ≥ 2 (stratified k-fold). ``groups`` keeps every group on one side of each split
(``StratifiedGroupKFold`` / ``GroupShuffleSplit``): items built in pairs (a true and a false
statement about the same country) otherwise leak across folds and bias the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError


def split_masks(y: Tensor, split: float | int = 0.6, *, groups: Sequence[Any] | None = None,
                seed: int = 42) -> Tensor:
    """Training masks ``[F, n]`` (the test rows of fold f are ``~masks[f]``)."""
    try:
        from sklearn import model_selection as ms
    except ImportError as err:  # pragma: no cover - the probes extra installs it
        raise MechkitError("probe splits need scikit-learn: pip install 'mechkit[probes]'") from err
    n = y.shape[0]
    labels = y.numpy()
    group_ids = _group_ids(groups, n)
    counts = torch.bincount(torch.unique(y, return_inverse=True)[1])
    if isinstance(split, bool) or not isinstance(split, (int, float)):
        raise MechkitError(f"split must be a training fraction in (0, 1) or a number of folds ≥ 2, got {split!r}")
    if isinstance(split, int):
        if split < 2:
            raise MechkitError(f"split={split}: k-fold needs at least 2 folds (or give a fraction like 0.6)")
        if int(counts.min()) < split:
            raise MechkitError(f"{split} folds need at least {split} samples of every class; the smallest class "
                               f"has {int(counts.min())}. Use fewer folds or a hold-out fraction")
        cls = ms.StratifiedGroupKFold if group_ids is not None else ms.StratifiedKFold
        splitter = cls(n_splits=split, shuffle=True, random_state=seed)
        pieces = list(splitter.split(labels, labels, group_ids))
    else:
        if not 0 < split < 1:
            raise MechkitError(f"split={split}: a hold-out split needs a training fraction in (0, 1)")
        if int(counts.min()) < 2:
            raise MechkitError("a stratified hold-out needs at least 2 samples of every class")
        if group_ids is not None:
            splitter = ms.GroupShuffleSplit(n_splits=1, train_size=split, random_state=seed)
        else:
            splitter = ms.StratifiedShuffleSplit(n_splits=1, train_size=split, random_state=seed)
        pieces = list(splitter.split(labels, labels, group_ids))
    masks = torch.zeros(len(pieces), n, dtype=torch.bool)
    for f, (train, _) in enumerate(pieces):
        masks[f, torch.as_tensor(train)] = True
    _check_both_sides(masks, y)
    return masks


def _group_ids(groups: Sequence[Any] | None, n: int) -> Any:
    if groups is None:
        return None
    groups = list(groups)
    if len(groups) != n:
        raise MechkitError(f"{n} samples but {len(groups)} group ids; give one group per sample")
    index: dict[Any, int] = {}
    return [index.setdefault(g, len(index)) for g in groups]


def _check_both_sides(masks: Tensor, y: Tensor) -> None:
    for f, train in enumerate(masks):
        if torch.unique(y[train]).numel() < 2 or int((~train).sum()) == 0:
            raise MechkitError(f"split {f} leaves a single class in training or no test rows; use more data, "
                               "fewer folds, or other groups")
