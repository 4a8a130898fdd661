"""mechkit: mechanistic interpretability with one site vocabulary over three backends.

Importing mechkit changes nothing global (no thread settings, no hooks, no logging config).
Heavy submodules are imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Site": "mechkit.sites",
    "load": "mechkit.loading",
    "Model": "mechkit.models.base",
    "ActivationCache": "mechkit.models.cache",
    "ActivationStore": "mechkit.activations.store",
    "collect": "mechkit.activations.collect",
    "CollectConfig": "mechkit.activations.config",
    "Result": "mechkit.results",
    "interventions": "mechkit.interventions",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "interventions" else getattr(module, name)
    raise AttributeError(f"module 'mechkit' has no attribute {name!r}")
