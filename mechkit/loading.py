"""``mechkit.load``: the one entry point, above models and the zoo, so that models never import the zoo."""

from __future__ import annotations

from typing import Any

from mechkit.models.base import Model
from mechkit.models.load import load as load_model

ZOO = "zoo:"


def load(model: Any, **kwargs: Any) -> Model:
    """Wrap ``model`` for analysis: anything :func:`mechkit.models.load.load` takes, or ``"zoo:NAME"``
    (a bundled or real zoo model, named so in provenance). Keywords as for that function."""
    if isinstance(model, str) and model.startswith(ZOO):
        from mechkit.zoo.registry import resolve

        return load_model(resolve(model[len(ZOO):]), name=kwargs.pop("name", model), **kwargs)
    return load_model(model, **kwargs)


__all__ = ["load"]
