"""Training a sparse autoencoder on activation batches through sae-lens's ``SAETrainer``.

The trainer reads any iterator of ``[batch, d_in]`` tensors, so the activations come from an
:class:`~mechkit.activations.ActivationStore` (one site) or a tensor already in memory. Everything
random (the weight initialisation, the data order) follows ``seed``; the global torch RNG is the
same afterwards as before.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.sae.config import TrainConfig

__all__ = ["latest_checkpoint", "train_sae"]


def train_sae(source: Any, site: str | None = None, config: TrainConfig | None = None, **options: Any) -> Any:
    """Train an SAE on ``source`` and return the trained sae-lens SAE (``encode``/``decode``, so
    ``model.splice(site, sae)`` accepts it).

    ``source``: an ActivationStore (``site`` names the column) or an ``[n, d]`` float tensor.
    Settings are the fields of :class:`TrainConfig`, as ``config=`` and/or keywords (keywords win).
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = TrainConfig.from_dict(options) if config is None else config.replace(**options)
    d_in, batches = _data(source, site, cfg)
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training import sae_trainer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = _build(cfg, d_in, site)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr,
            device="cpu", n_checkpoints=cfg.n_checkpoints, checkpoint_path=cfg.out_dir,
            save_final_checkpoint=cfg.out_dir is not None,
            logger=LoggingConfig(log_to_wandb=False))
        bar = functools.partial(sae_trainer.tqdm, disable=not cfg.progress)
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
        if cfg.resume:
            _resume(trainer, cfg)
        with mock.patch.object(sae_trainer, "tqdm", bar):
            sae = trainer.fit()
    return sae.eval()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The sae-lens checkpoint folder in ``out_dir`` with the most training samples (None if none)."""
    folders = [p for p in Path(out_dir).glob("*") if p.is_dir() and p.name.removeprefix("final_").isdigit()]
    return max(folders, key=lambda p: int(p.name.removeprefix("final_")), default=None)


def _resume(trainer: Any, cfg: TrainConfig) -> None:
    """Load the latest checkpoint's weights and trainer state and skip the batches it already saw
    (the data order is fixed by the seed, so the run continues as if never stopped)."""
    from sae_lens.constants import SAE_WEIGHTS_FILENAME
    from safetensors.torch import load_file

    path = latest_checkpoint(cfg.out_dir) if cfg.out_dir is not None else None
    if path is None:
        return
    try:
        trainer.sae.load_state_dict(load_file(str(path / SAE_WEIGHTS_FILENAME)))
        trainer.load_trainer_state(path)
    except Exception as e:  # truncated or foreign files: say which folder and what to do
        raise MechkitError(f"cannot resume from the checkpoint {path}: {type(e).__name__}: {e}; "
                           "delete that folder to resume from an earlier checkpoint, or start afresh") from e
    done = trainer.n_training_samples // cfg.batch_size
    trainer.n_training_steps = done  # sae-lens records the count before the step that saved it
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    trainer.data_provider = itertools.islice(trainer.data_provider, done, None)


def _build(cfg: TrainConfig, d_in: int, site: str | None) -> Any:
    """A freshly initialised sae-lens training SAE (initialised from the global RNG, seeded by the caller)."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=str(site) if site is not None else None)
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, metadata=metadata))
    if cfg.architecture == "standard":
        sae_cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient,
                                            metadata=metadata)
        return StandardTrainingSAE(sae_cfg)
    raise MechkitError(f"unknown architecture {cfg.architecture!r}")  # TrainConfig.check refuses it first


def _data(source: Any, site: str | None, cfg: TrainConfig) -> tuple[int, Iterator[Tensor]]:
    """The input width and an endless iterator of ``[batch_size, d]`` float32 batches."""
    from mechkit.activations.store import ActivationStore

    if isinstance(source, ActivationStore):
        if site is None:
            raise MechkitError("training from an ActivationStore needs site= (one of its columns)")
        column = source[site]
        if len(column) < cfg.batch_size:
            raise MechkitError(f"the store holds {len(column)} rows of {site}, fewer than one batch of "
                               f"{cfg.batch_size}; lower batch_size or collect more tokens")
        return column.shape[1], _store_batches(source, site, cfg)
    if isinstance(source, Tensor):
        x = _check_rows(source, cfg.batch_size)
        return x.shape[1], _tensor_batches(x, cfg)
    raise MechkitError(f"cannot train on a {type(source).__name__}: pass an ActivationStore or an [n, d] tensor")


def _check_rows(x: Tensor, batch_size: int) -> Tensor:
    if x.dim() != 2 or not x.is_floating_point():
        raise MechkitError(f"activations must be a float [n, d] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise MechkitError(f"activations are empty (shape {tuple(x.shape)})")
    if x.shape[0] < batch_size:
        raise MechkitError(f"{x.shape[0]} activation rows are fewer than one batch of {batch_size}; lower batch_size")
    if not torch.isfinite(x).all():
        raise MechkitError("activations contain NaN or infinite values")
    return x.detach().to(torch.float32)


def _tensor_batches(x: Tensor, cfg: TrainConfig) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(cfg.seed)
    n, b = x.shape[0], cfg.batch_size
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - b + 1, b):
            yield x[order[start:start + b]]


def _store_batches(store: Any, site: str, cfg: TrainConfig) -> Iterator[Tensor]:
    epoch = 0
    while True:
        for batch in store.batches(site, cfg.batch_size, seed=cfg.seed + epoch, drop_last=True,
                                   dtype=torch.float32):
            if not torch.isfinite(batch).all():
                raise MechkitError(f"the store's {site} activations contain NaN or infinite values")
            yield batch
        epoch += 1
