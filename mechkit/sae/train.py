"""Training a sparse autoencoder through sae-lens's ``SAETrainer``.

The trainer reads any iterator of ``[batch, d_in]`` tensors, so the activations come from an
:class:`~mechkit.activations.ActivationStore` (one site), a tensor already in memory, or a wrapped
model and prompts (the real tokens at ``site``, collected once, see :mod:`mechkit.sae.source`).
Everything random (the weight initialisation, the data order) follows ``seed``; the global torch
RNG is the same afterwards as before. A run with ``out_dir`` writes sae-lens checkpoints (``resume``
continues the latest one as if the run had never stopped) and its final SAE, with provenance, to
``out_dir/sae`` (:func:`mechkit.sae.io.save_sae`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.sae.config import TrainConfig
from mechkit.sae.io import save_sae, to_inference
from mechkit.sae.source import is_model, model_activations

__all__ = ["FINAL_SAE", "STORE", "LiveFigures", "batch_fvu", "latest_checkpoint", "train_sae"]

FINAL_SAE = "sae"  # out_dir/sae: the final SAE (save_sae's folder)
STORE = "activations"  # out_dir/activations: the store collected from a model
POSTFIX_EVERY = 10  # steps between progress-bar figure updates (FVU costs one pass over a batch)


def train_sae(source: Any, site: str | None = None, config: TrainConfig | None = None, *,
              prompts: Sequence[Any] | None = None, **options: Any) -> Any:
    """Train an SAE on ``source`` and return the trained sae-lens inference SAE (``encode``/``decode``,
    so ``model.splice(site, sae)`` accepts it; a BatchTopK SAE becomes the JumpReLU SAE it saves as).

    ``source``: an ActivationStore (``site`` names the column), an ``[n, d]`` float tensor, or a wrapped
    mechkit Model with ``prompts`` (texts or token-id lists; the real tokens at ``site`` are collected
    once, into ``out_dir/activations`` when ``out_dir`` is set, else in memory).
    Settings are the fields of :class:`TrainConfig`, as ``config=`` and/or keywords (keywords win).
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = TrainConfig.from_dict(options) if config is None else config.replace(**options)
    source, model_record = _from_model(source, site, prompts, cfg)
    d_in, batches = _data(source, site, cfg)
    from sae_lens.training import sae_trainer

    bar = functools.partial(sae_trainer.tqdm, disable=not cfg.progress, unit="tok")
    with torch.random.fork_rng(devices=[]), mock.patch.object(sae_trainer, "tqdm", bar):
        torch.manual_seed(cfg.seed)
        trainer = _trainer(cfg, d_in, site, batches)
        if cfg.resume:
            _resume(trainer, cfg)
        sae = to_inference(trainer.fit())
    if cfg.out_dir is not None:
        save_sae(sae, Path(cfg.out_dir) / FINAL_SAE, site=site, model=model_record, config=cfg)
    return sae


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The sae-lens checkpoint folder in ``out_dir`` with the most training samples (None if none)."""
    folders = [p for p in Path(out_dir).glob("*") if p.is_dir() and p.name.removeprefix("final_").isdigit()]
    return max(folders, key=lambda p: int(p.name.removeprefix("final_")), default=None)


class LiveFigures:
    """The progress bar's figures, from what sae-lens's training step already counts: L0 is the mean
    number of active latents per row since the previous update (the trainer's firing counts), FVU is
    ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the step's batch, dead is the fraction of latents the trainer
    marks dead (none active over the last ``dead_window`` tokens)."""

    def __init__(self) -> None:
        self.fired, self.seen = 0.0, 0

    def update(self, trainer: Any, output: Any) -> dict[str, float]:
        fired, seen = float(trainer.act_freq_scores.double().sum()), trainer.n_frac_active_samples
        if seen < self.seen:  # sae-lens began a new sparsity window: its counts restarted from zero
            self.fired, self.seen = 0.0, 0
        l0 = (fired - self.fired) / max(seen - self.seen, 1)
        self.fired, self.seen = fired, seen
        return {"L0": l0, "FVU": batch_fvu(output.sae_in, output.sae_out),
                "dead": float(trainer.dead_neurons.double().mean())}


def batch_fvu(x: Tensor, x_hat: Tensor) -> float:
    """FVU of one batch in its own dtype (float32 in training: a figure to watch, not to report)."""
    with torch.no_grad():
        total = (x - x.mean(0)).square().sum()
        return float((x - x_hat).square().sum() / total) if total > 0 else float("nan")


# -- the trainer --------------------------------------------------------------------------------
def _trainer(cfg: TrainConfig, d_in: int, site: str | None, batches: Iterator[Tensor]) -> Any:
    """An sae-lens SAETrainer around a freshly initialised SAE (drawn from the global RNG, seeded by the caller)."""
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    class Trainer(SAETrainer):
        """SAETrainer whose bar advances every step and shows live L0 / FVU / dead fraction."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.live = LiveFigures()

        # replaces sae-lens's own bar update (a jump every 100 steps, losses in the description)
        def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
            pbar.update(step_output.sae_in.shape[0])
            last = self.n_training_samples >= self.cfg.total_training_samples
            if not pbar.disable and (self.n_training_steps % POSTFIX_EVERY == 1 or last):
                figures = self.live.update(self, step_output)
                pbar.set_postfix({"L0": f"{figures['L0']:.1f}", "FVU": f"{figures['FVU']:.3f}",
                                  f"dead/{_tokens(cfg.dead_window_steps * cfg.batch_size)}": f"{figures['dead']:.1%}"},
                                 refresh=False)

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr,
        device="cpu", n_checkpoints=cfg.n_checkpoints, checkpoint_path=cfg.out_dir,
        save_final_checkpoint=cfg.out_dir is not None,
        # sae-lens marks a latent dead after more than this many steps without firing
        dead_feature_window=cfg.dead_window_steps - 1,
        logger=LoggingConfig(log_to_wandb=False))
    return Trainer(cfg=trainer_cfg, sae=_build(cfg, d_in, site), data_provider=batches)


def _tokens(n: int) -> str:
    """``1_000_192`` → ``1M``, ``512`` → ``512``: the dead window in the bar's label."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _build(cfg: TrainConfig, d_in: int, site: str | None) -> Any:
    """A freshly initialised sae-lens training SAE (initialised from the global RNG, seeded by the caller)."""
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    from mechkit.sae.sparse_topk import SparseTopKTrainingSAE  # sae-lens's TopK, with a sparse decode

    common = dict(d_in=d_in, d_sae=cfg.d_sae, metadata=SAEMetadata(hook_name=str(site) if site is not None else None))
    builders = {
        "topk": lambda: SparseTopKTrainingSAE(sl.TopKTrainingSAEConfig(k=cfg.k, **common)),
        "batchtopk": lambda: sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=cfg.k, **common)),
        "matryoshka_batchtopk": lambda: sl.MatryoshkaBatchTopKTrainingSAE(sl.MatryoshkaBatchTopKTrainingSAEConfig(
            k=cfg.k, matryoshka_widths=list(cfg.widths), **common)),
        "standard": lambda: sl.StandardTrainingSAE(
            sl.StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)),
        "gated": lambda: sl.GatedTrainingSAE(sl.GatedTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)),
        "jumprelu": lambda: sl.JumpReLUTrainingSAE(
            sl.JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l0_coefficient, **common)),
    }
    if cfg.architecture not in builders:  # TrainConfig.check refuses it first
        raise MechkitError(f"unknown architecture {cfg.architecture!r}")
    return builders[cfg.architecture]()


def _resume(trainer: Any, cfg: TrainConfig) -> None:
    """Load the latest checkpoint's weights and trainer state and skip the batches it already saw
    (the data order is fixed by the seed, so the run continues as if never stopped)."""
    path = latest_checkpoint(cfg.out_dir) if cfg.out_dir is not None else None
    if path is None:
        return
    try:
        trainer.sae.load_weights_from_checkpoint(path)
        trainer.load_trainer_state(path)
    except Exception as e:  # truncated or foreign files: say which folder and what to do
        raise MechkitError(f"cannot resume from the checkpoint {path}: {type(e).__name__}: {e}; "
                           "delete that folder to resume from an earlier checkpoint, or start afresh") from e
    done = trainer.n_training_samples // cfg.batch_size
    trainer.n_training_steps = done  # sae-lens records the count before the step that saved it
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    trainer.data_provider = itertools.islice(trainer.data_provider, done, None)


# -- the data -----------------------------------------------------------------------------------
def _from_model(source: Any, site: str | None, prompts: Sequence[Any] | None, cfg: TrainConfig) -> tuple[Any, Any]:
    """A model and prompts become their activations at ``site``; also what provenance records as the model."""
    if not is_model(source):
        if prompts is not None:
            raise MechkitError("prompts= goes with a wrapped model as the source; a store or a tensor already holds "
                               "activations")
        return source, getattr(source, "provenance", None)
    if site is None or prompts is None:
        raise MechkitError("training from a model needs site= (one per-token site) and prompts= (texts or token-id "
                           "lists)")
    store = None if cfg.out_dir is None else Path(cfg.out_dir) / STORE
    rows = model_activations(source, prompts, site, batch_size=cfg.collect_batch_size, store_dir=store,
                             progress=cfg.progress)
    return rows, source


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
    raise MechkitError(f"cannot train on a {type(source).__name__}: pass an ActivationStore, an [n, d] tensor, or a "
                       "wrapped mechkit Model with prompts=")


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
