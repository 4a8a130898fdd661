"""sae-lens's TopK training SAE with a training step that touches only the active latents.

sae-lens's ``TopKTrainingSAE`` decodes the dense ``[batch, d_sae]`` activations with a dense matmul
and differentiates through the whole encoder output, although only ``k`` latents per row are
non-zero: on a CPU the dense decode and the three dense ``batch × d_sae × d_in`` products of its
backward pass dominate the step, where only the encoder's forward product is needed.
:class:`SparseTopKTrainingSAE` keeps the architecture, the parameters, the losses (MSE plus the
auxiliary dead-latent loss) and the folder format, and changes only how the step computes them:

- the encoder runs once without a graph, and the top k per row is found in two narrow passes
  (:func:`topk_indices`) instead of one top-k over all ``d_sae`` latents;
- the selected pre-activations get their gradient through :class:`_SelectedPreacts`, whose
  backward gathers ``k`` rows of ``W_enc`` for the input and scatters into ``W_enc`` / ``b_enc``
  only at the selected latents (a sparse ``[d_sae, batch]`` product);
- the decoder sums the ``k`` active rows of ``W_dec`` per token (``embedding_bag``), whose backward
  writes ``W_dec``'s gradient only for those rows;
- the auxiliary loss looks only at the dead latents' columns (all of them, without a second top-k,
  when there are no more than ``k_aux``).

The outputs and gradients equal sae-lens's own to float rounding. ``feature_acts`` comes back as a
sparse COO tensor (sae-lens's trainer and :func:`mechkit.sae.train.live_metrics` read both kinds).
Everything else, inference ``encode``/``decode``/``forward``, saving and checkpoints, is sae-lens's
own; the saved folder is an ordinary sae-lens TopK SAE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import TopKTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import Tensor

__all__ = ["SparseTopKTrainingSAE", "topk_indices"]

# input normalisations that sae-lens applies inside the SAE (the others happen in the trainer)
_IN_SAE_NORMALISATION = ("constant_norm_rescale", "layer_norm")


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """A drop-in ``TopKTrainingSAE`` (same config, parameters and folders) whose
    ``training_forward_pass`` computes the step sparsely. It falls back to sae-lens's dense step when
    hooks are attached to the SAE, the input is not ``[batch, d_in]``, or the SAE normalises its
    input itself (``constant_norm_rescale``, ``layer_norm``), so a hook sees what it would see there."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self._sparse_step_applies(step_input.sae_in):
            return super().training_forward_pass(step_input)
        x = step_input.sae_in
        sae_in = self.process_sae_in(x)
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        hidden_pre, idx = _encode_no_graph(sae_in, self.W_enc, self.b_enc, scale, self.cfg.k)
        dead = self._dead_columns(step_input.dead_neuron_mask)
        aux_idx = None if dead is None else _aux_indices(hidden_pre, dead, self.cfg.d_in // 2)
        all_idx = idx if aux_idx is None else torch.cat([idx, aux_idx], dim=1)
        selected = _SelectedPreacts.apply(sae_in, self.W_enc, self.b_enc, scale, all_idx,
                                          hidden_pre.gather(1, all_idx))
        k = self.cfg.k
        acts = selected[:, :k].relu()
        inv_scale = None if scale is None else 1 / scale
        sae_out = _decode_rows(idx, acts, self.W_dec, inv_scale) + self.b_dec
        mse_loss = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss}
        aux = sae_out.new_tensor(0.0)
        if aux_idx is not None:
            recons = _decode_rows(aux_idx, selected[:, k:], self.W_dec, inv_scale)
            residual = (x - sae_out).detach()
            weight = self.cfg.aux_loss_coefficient * min(len(dead) / (self.cfg.d_in // 2), 1.0)
            aux = weight * (recons - residual).pow(2).sum(dim=-1).mean()
        losses["auxiliary_reconstruction_loss"] = aux
        return TrainStepOutput(sae_in=x, sae_out=sae_out, feature_acts=_coo(idx, acts.detach(), self.cfg.d_sae),
                               hidden_pre=hidden_pre, loss=mse_loss + aux, losses=losses)

    def _sparse_step_applies(self, x: Tensor) -> bool:
        hooked = any(hook._forward_hooks or hook._backward_hooks for hook in self.hook_dict.values())
        return (not hooked and x.dim() == 2 and x.shape[-1] == self.cfg.d_in
                and self.cfg.normalize_activations not in _IN_SAE_NORMALISATION
                and not torch.is_autocast_enabled(x.device.type))

    def _dead_columns(self, mask: Tensor | None) -> Tensor | None:
        """The dead latents' indices, None when there are none (sae-lens then adds a zero aux loss)."""
        if mask is None:
            return None
        dead = mask.nonzero().flatten()
        return dead if len(dead) > 0 else None


# -- the pieces of the step ------------------------------------------------------------------------
@torch.no_grad()
def _encode_no_graph(sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, scale: Tensor | None,
                     k: int) -> tuple[Tensor, Tensor]:
    """The dense ``hidden_pre`` sae-lens computes (``(x W_enc + b_enc)·‖W_dec‖``, here with the norm
    folded into the ``[d_in, d_sae]`` weights rather than applied to the ``[batch, d_sae]`` output)
    and its top-k indices per row."""
    if scale is not None:
        W_enc, b_enc = W_enc * scale, b_enc * scale
    hidden_pre = torch.addmm(b_enc, sae_in, W_enc)
    return hidden_pre, topk_indices(hidden_pre, k)


def topk_indices(h: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` largest entries of each row of ``h`` (in no particular order), as
    ``h.topk(k).indices``, but faster when ``k`` is far below the row width.

    Split each row into ``g`` groups (entries ``c, c + w, c + 2w, …`` for ``w = width / g``, so
    the group maxima are one contiguous reduction): every top-k entry lies in one of the ``k``
    groups with the largest maxima (were it in another group, those ``k`` maxima would be ``k``
    entries larger than it), so the top k of those ``k · g`` entries are the top k of the row.
    Among exactly equal values the choice may differ from ``topk``'s, which is arbitrary too."""
    rows, width = h.shape
    g = _group_size(width, k)
    if g is None:
        return h.topk(k, dim=-1, sorted=False).indices
    w = width // g
    best = h.view(rows, g, w).amax(1).topk(k, dim=-1, sorted=False).indices  # [rows, k] group numbers
    candidates = (best.unsqueeze(-1) + torch.arange(0, width, w, device=h.device)).view(rows, k * g)
    pick = h.gather(1, candidates).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(1, pick)


def _group_size(width: int, k: int) -> int | None:
    """Entries per group for :func:`topk_indices`: a power of two near ``√(width / k)`` (balancing the
    two passes' widths, ``width / g`` and ``k · g``) that divides ``width``; None when grouping saves
    nothing."""
    g = 2 ** round(math.log2(max(width / k, 1)) / 2)
    while g > 1 and width % g:
        g //= 2
    return g if g > 1 and k * g * 2 <= width else None


def _aux_indices(hidden_pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """Per row, the ``k_aux`` dead latents with the largest pre-activations (sae-lens's choice for the
    auxiliary loss; order does not matter). With at most ``k_aux`` dead latents that is all of them."""
    if len(dead) <= k_aux:
        return dead.expand(hidden_pre.shape[0], -1)
    with torch.no_grad():
        top = hidden_pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False).indices
    return dead[top]


def _decode_rows(idx: Tensor, acts: Tensor, W_dec: Tensor, inv_scale: Tensor | None) -> Tensor:
    """``Σ_i acts[b, i] · W_dec[idx[b, i]]`` (scaled by ``1/‖W_dec[idx]‖`` as sae-lens rescales); the
    backward pass writes gradient rows of ``W_dec`` only for the latents in ``idx``."""
    weights = acts if inv_scale is None else acts * inv_scale[idx]
    return F.embedding_bag(idx, W_dec, per_sample_weights=weights, mode="sum")


def _coo(idx: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The ``[batch, d_sae]`` activations as a sparse COO tensor (the trainer only counts firings)."""
    rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    return torch.sparse_coo_tensor(torch.stack([rows, idx.flatten()]), values.flatten(), (idx.shape[0], d_sae),
                                   check_invariants=False)


def _rows_by_latent(idx: Tensor, weights: Tensor, d_sae: int) -> Tensor:
    """The sparse ``[d_sae, batch]`` matrix with ``weights[b, i]`` at ``(idx[b, i], b)`` (repeats add up)."""
    rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    return torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]), weights.flatten(), (d_sae, idx.shape[0]),
                                   check_invariants=False)


class _SelectedPreacts(torch.autograd.Function):
    """``hidden_pre[b, idx[b, i]]`` for ``hidden_pre = (sae_in W_enc + b_enc)·scale``, the values given
    (computed without a graph); the backward pass touches only the selected latents."""

    @staticmethod
    def forward(ctx: Any, sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, scale: Tensor | None, idx: Tensor,
                values: Tensor) -> Tensor:
        ctx.save_for_backward(sae_in, W_enc, scale, idx, values)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        sae_in, W_enc, scale, idx, values = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_scale = None
        if scale is not None:
            picked = scale[idx]
            if ctx.needs_input_grad[3]:  # d hidden / d scale = the unscaled pre-activation
                grad_scale = torch.zeros_like(scale).index_add_(0, idx.flatten(), (grad * values / picked).flatten())
            grad = grad * picked
        grad_in = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_in = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(_rows_by_latent(idx, grad, d_sae), sae_in).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, idx.flatten(),
                                                                                           grad.flatten())
        return grad_in, grad_w, grad_b, grad_scale, None, None
