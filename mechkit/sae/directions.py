"""The decoder directions an SAE actually writes: ``decode(e_i) − decode(0)`` per latent.

sae-lens's training SAEs may rescale latents by the decoder-row norms inside ``decode``
(``rescale_acts_by_decoder_norm``), so the raw ``W_dec`` rows are not the directions added to the
model; this reads them through ``decode`` itself and is exact for any affine decoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["decoder_directions", "n_latents"]


def n_latents(sae: Any) -> int:
    """The number of latents (from sae-lens's ``cfg.d_sae`` or the decoder's rows)."""
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and getattr(cfg, "d_sae", None):
        return int(cfg.d_sae)
    w_dec = getattr(sae, "W_dec", None)
    if isinstance(w_dec, Tensor):
        return int(w_dec.shape[0])
    raise MechkitError(f"cannot tell how many latents a {type(sae).__name__} has: give it cfg.d_sae or W_dec")


def decoder_directions(sae: Any, latents: Any = None) -> Tensor:
    """``[n, d_in]``: the change of the reconstruction per unit of each latent (all latents, or the
    indices ``latents``), detached."""
    d_sae = n_latents(sae)
    index = torch.arange(d_sae) if latents is None else torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if index.numel() and (index.min() < 0 or index.max() >= d_sae):
        raise MechkitError(f"latent indices must be in [0, {d_sae}), got {index.tolist()}")
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        units = torch.zeros(index.numel() + 1, d_sae, dtype=dtype)
        units[torch.arange(index.numel()), index] = 1.0
        out = sae.decode(units)
    return (out[:-1] - out[-1]).detach()
