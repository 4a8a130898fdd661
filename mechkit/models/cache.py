"""In-memory activation cache: a read-only mapping from :class:`Site` to tensor, with provenance."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import UnknownSiteError
from mechkit.sites import Site, nearest_names, select


class ActivationCache(Mapping):
    """Activations of one run. Keys are sites; ``cache["blocks.0.attn.z.h1"]`` narrows a cached head.

    ``attention_mask`` marks real (non-padding) tokens; ``provenance`` records the model, backend,
    sites, input shape and mechkit version.
    """

    def __init__(
        self,
        tensors: Mapping[Site, Tensor],
        provenance: Mapping[str, Any] | None = None,
        attention_mask: Tensor | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self.provenance = dict(provenance or {})
        self.attention_mask = attention_mask

    # -- Mapping --------------------------------------------------------------------------------
    def __getitem__(self, key: str | Site) -> Tensor:
        site = Site.parse(key)
        if site in self._tensors:
            return self._tensors[site]
        if site.base in self._tensors:  # narrow a cached head / expert
            return narrow(self._tensors[site.base], site)
        raise UnknownSiteError(
            f"{site} is not in this cache; {nearest_names(str(site), [str(s) for s in self._tensors])}"
        )

    def __iter__(self) -> Iterator[Site]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        try:
            site = Site.parse(key)  # type: ignore[arg-type]
        except (UnknownSiteError, TypeError):
            return False
        return site in self._tensors or site.base in self._tensors

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}: {tuple(t.shape)}" for s, t in list(self._tensors.items())[:6])
        more = "" if len(self) <= 6 else f", … {len(self) - 6} more"
        return f"ActivationCache({shapes}{more})"

    # -- helpers --------------------------------------------------------------------------------
    def stack(self, sites: str | Sequence[str | Site]) -> Tensor:
        """Stack the tensors of several sites (names or a glob) along a new leading axis."""
        chosen = select(sites, list(self._tensors))
        return torch.stack([self[s] for s in chosen])

    def to(self, *args: Any, **kwargs: Any) -> ActivationCache:
        moved = {s: t.to(*args, **kwargs) for s, t in self.items()}
        return ActivationCache(moved, self.provenance, self.attention_mask)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (provenance as JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {str(s): t.detach().contiguous().cpu() for s, t in self.items()}
        if self.attention_mask is not None:
            tensors["__attention_mask__"] = self.attention_mask.cpu().contiguous()
        save_file(tensors, str(path), metadata={"provenance": json.dumps(self.provenance, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> ActivationCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        mask = tensors.pop("__attention_mask__", None)
        return cls({Site.parse(k): v for k, v in tensors.items()}, json.loads(meta.get("provenance", "{}")), mask)


def narrow(tensor: Tensor, site: Site) -> Tensor:
    """Slice a base-site tensor down to the head / expert ``site`` names."""
    from mechkit.sites import AXES

    if site.head is None and site.expert is None:
        return tensor
    axes = AXES[site.kind]
    if site.head is not None:
        return tensor.select(axes.index("head"), site.head)
    return tensor.select(axes.index("expert"), site.expert)


def widen(tensor: Tensor, site: Site, value: Tensor) -> Tensor:
    """``tensor`` with the head / expert slice named by ``site`` replaced by ``value`` (out of place)."""
    from mechkit.sites import AXES

    axis = "head" if site.head is not None else "expert"
    dim = AXES[site.kind].index(axis)
    index = torch.tensor([site.head if site.head is not None else site.expert], device=tensor.device)
    return tensor.index_copy(dim, index, value.unsqueeze(dim).to(tensor.dtype))
