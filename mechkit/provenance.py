"""The one provenance builder: what produced a cache, a store or a result.

Every artifact records the same keys, so two artifacts can be compared field by field::

    mechkit_version, model, backend, architecture, dtype, attn_implementation, sites, ...extra

``extra`` carries what the producer adds (input shape, seeds, a config's ``to_dict()``).
Values are JSON-ready (str, int, float, bool, None, lists and dicts of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODEL_KEYS = ("model", "backend", "architecture", "dtype", "attn_implementation")


def provenance(model: Any = None, sites: Any = None, **extra: Any) -> dict[str, Any]:
    """A provenance dict for ``model`` (a :class:`mechkit.Model`) and ``sites``, plus ``extra``."""
    from mechkit import __version__

    record: dict[str, Any] = {"mechkit_version": __version__}
    if model is not None:
        record |= model_identity(model)
    if sites is not None:
        record["sites"] = [str(s) for s in ([sites] if isinstance(sites, str) or not isinstance(sites, Sequence)
                                            else sites)]
    return record | extra


def model_identity(model: Any) -> dict[str, Any]:
    """Name, backend, architecture, parameter dtype and attention implementation of a wrapped model."""
    module = getattr(model, "torch_module", None)
    return {
        "model": model.info.name,
        "backend": model.backend,
        "architecture": model.info.architecture,
        "dtype": _dtype(module),
        "attn_implementation": _attn_implementation(module),
    }


def _dtype(module: Any) -> str | None:
    params = getattr(module, "parameters", None)
    if params is None:
        return None
    first = next(iter(params()), None)
    return None if first is None else str(first.dtype).removeprefix("torch.")


def _attn_implementation(module: Any) -> str | None:
    for owner in (module, getattr(module, "original_model", None)):  # HF model, or the one under a Bridge
        config = getattr(owner, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str):
            return impl
    return None


__all__ = ["MODEL_KEYS", "model_identity", "provenance"]
