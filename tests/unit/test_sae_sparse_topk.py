"""SparseTopKTrainingSAE against sae-lens's TopKTrainingSAE: same step outputs, gradients, trainer state and folders."""

from __future__ import annotations

import pytest
import sae_lens as sl
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput

from mechkit.sae.io import to_inference
from mechkit.sae.sparse_topk import SparseTopKTrainingSAE, topk_indices

D_IN, D_SAE, K, BATCH = 16, 192, 5, 40  # d_sae ≥ 2·16·k: the grouped top-k runs; aux loss: up to D_IN // 2 = 8 dead


def pair(dtype: str = "float64", **cfg: object) -> tuple[sl.TopKTrainingSAE, SparseTopKTrainingSAE]:
    """sae-lens's SAE and the sparse one with the same random (not freshly initialised) weights."""
    config = dict(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype, **cfg)
    torch.manual_seed(0)
    ref = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(**config))
    new = SparseTopKTrainingSAE(sl.TopKTrainingSAEConfig(**config))
    with torch.no_grad():
        for p, q in zip(ref.parameters(), new.parameters(), strict=True):
            p.copy_(torch.randn_like(p) * 0.5)  # non-zero biases, uneven decoder norms
            q.copy_(p)
    return ref, new


def step(sae: sl.TopKTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> tuple[object, dict]:
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 40])  # no aux loss; all dead latents; top 8 of the dead latents
def test_step_outputs_and_gradients_equal_sae_lens(rescale, apply_b_dec, n_dead):
    ref, new = pair(rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(BATCH, D_IN, dtype=torch.float64) * 2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    (a, grads_a), (b, grads_b) = step(ref, x, dead), step(new, x, dead)
    assert b.feature_acts.is_sparse  # the sparse step ran, not the dense fallback
    torch.testing.assert_close(dense(b.feature_acts), dense(a.feature_acts))
    torch.testing.assert_close(b.sae_out, a.sae_out)
    torch.testing.assert_close(b.hidden_pre, a.hidden_pre.detach())
    assert a.losses.keys() == b.losses.keys()
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name])
    torch.testing.assert_close(b.loss, a.loss)
    assert (float(a.losses["auxiliary_reconstruction_loss"].detach()) > 0) == (n_dead > 0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=lambda m, n=name: f"{n}: {m}")


def test_hooked_sae_takes_sae_lens_dense_step():
    ref, new = pair()
    seen = []
    new.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.shape))
    x = torch.randn(BATCH, D_IN, dtype=torch.float64)
    (a, grads_a), (b, grads_b) = step(ref, x, None), step(new, x, None)
    assert seen == [(BATCH, D_SAE)] and not b.feature_acts.is_sparse
    torch.testing.assert_close(b.sae_out, a.sae_out)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad)


def test_trainer_runs_alike():
    """Through sae-lens's SAETrainer (Adam, clipping, firing counts read from the sparse activations) the
    two SAEs stay together over steps that mark latents dead and revive them through the aux loss."""
    x = torch.randn(12 * 64, D_IN, generator=torch.Generator().manual_seed(1))
    trainers = []
    for cls in (sl.TopKTrainingSAE, SparseTopKTrainingSAE):
        torch.manual_seed(0)
        sae = cls(sl.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        cfg = SAETrainerConfig(total_training_samples=x.shape[0], train_batch_size_samples=64, device="cpu",
                               lr=1e-2, lr_end=1e-2, n_checkpoints=0, checkpoint_path=None, dead_feature_window=2,
                               logger=sl.LoggingConfig(log_to_wandb=False))
        trainer = sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(x.split(64)))
        trainer.fit()
        trainers.append(trainer)
    ref, new = trainers
    assert ref.dead_neurons.any()  # the aux loss took part
    torch.testing.assert_close(new.n_forward_passes_since_fired, ref.n_forward_passes_since_fired)
    torch.testing.assert_close(new.act_freq_scores, ref.act_freq_scores)
    for (name, p), q in zip(ref.sae.named_parameters(), new.sae.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_saves_and_loads_as_an_ordinary_sae_lens_topk_sae(tmp_path):
    ref, new = pair(dtype="float32")
    new.save_inference_model(tmp_path / "sae")
    loaded = sl.SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is sl.TopKSAE and loaded.cfg.architecture() == "topk"
    x = torch.randn(BATCH, D_IN)
    with torch.no_grad():
        expected = to_inference(ref)(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(to_inference(new)(x), expected)
    # a training checkpoint of the sparse SAE loads into sae-lens's own training SAE
    new.save_model(tmp_path / "checkpoint")
    back = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    back.load_weights_from_checkpoint(tmp_path / "checkpoint")
    for p, q in zip(new.parameters(), back.parameters(), strict=True):
        torch.testing.assert_close(q, p)


@pytest.mark.parametrize("width", [4608, 1024, 100, 48, 97])  # grouped, or plain topk (k = 32 on 48 or 100; 97)
def test_topk_indices_are_topks(width):
    torch.manual_seed(0)
    h = torch.randn(64, width)
    h[0, :32] += 10  # a row whose top k all sit in the first two groups
    h[1, ::16] += 10  # one per group
    for k in (1, 5, 32):
        if k > width:
            continue
        ours = topk_indices(h, k).sort(-1).values
        torch.testing.assert_close(ours, h.topk(k, dim=-1).indices.sort(-1).values)
