"""The Result base class: what every analysis returns.

A result is a frozen dataclass of tensors and plain values plus ``provenance`` (model, backend,
sites, seeds, mechkit version). It shows itself as a tidy frame (``to_frame``) and a figure
(``plot``) and saves to a folder as ``tensors.safetensors`` + ``result.json`` — never pickle::

    @dataclass(frozen=True, eq=False)
    class ProbeSweepResult(Result):
        accuracy: Tensor          # [layers]
        layers: list[int]

        def to_frame(self):
            return pd.DataFrame({"layer": self.layers, "accuracy": self.accuracy.tolist()})

    ProbeSweepResult(torch.rand(3), [0, 1, 2], provenance=provenance(model, sites, seed=0))
    Result.load(folder)   # → a ProbeSweepResult

Subclasses register themselves by definition; ``Result.load`` rebuilds the recorded class.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.provenance import provenance

TENSORS, RESULT = "tensors.safetensors", "result.json"
_TAGS = ("__tensor__", "__tuple__", "__float__")
_REGISTRY: dict[str, type[Result]] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """Base of all analysis results. Subclass with ``@dataclass(frozen=True, eq=False)``."""

    provenance: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)

    _format: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[_class_key(cls)] = cls

    # -- presentation (subclasses override) -----------------------------------------------------
    def to_frame(self) -> Any:
        """A tidy pandas DataFrame: one row per observation, one column per variable."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define to_frame(); read its fields directly "
            f"({', '.join(f.name for f in dataclasses.fields(self))}) or implement to_frame() in the subclass"
        )

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib Figure showing the result."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define plot(); use to_frame() and plot the frame, "
            "or implement plot() in the subclass"
        )

    # -- comparison -------------------------------------------------------------------------
    def equals(self, other: Any) -> bool:
        """Same class and equal fields (tensors compared with ``torch.equal``, dtype included)."""
        return type(self) is type(other) and all(
            _equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``tensors.safetensors`` and ``result.json`` into ``folder`` (created if needed)."""
        from safetensors.torch import save_file

        from mechkit import __version__

        folder = Path(folder)
        tensors: dict[str, Tensor] = {}
        fields = {f.name: _encode(getattr(self, f.name), f.name, tensors) for f in dataclasses.fields(self)}
        document = {"format": self._format, "class": type(self).__qualname__, "module": type(self).__module__,
                    "mechkit_version": __version__, "fields": fields}
        text = json.dumps(document, indent=1, allow_nan=False)  # validates before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        # clone: safetensors refuses tensors sharing memory, and views of larger tensors
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(folder / TENSORS))
        (folder / RESULT).write_text(text + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Result:
        """Rebuild a saved result as its recorded subclass (which must be importable)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / RESULT).is_file():
            raise MechkitError(f"{folder} holds no {RESULT}; point to a folder written by Result.save")
        document = json.loads((folder / RESULT).read_text())
        target = _lookup(document.get("module", ""), document.get("class", ""))
        if not issubclass(target, cls):
            raise MechkitError(f"{folder} holds a {target.__name__}, not a {cls.__name__}")
        tensors = load_file(str(folder / TENSORS)) if (folder / TENSORS).is_file() else {}
        values = {name: _decode(value, tensors) for name, value in document["fields"].items()}
        known = {f.name for f in dataclasses.fields(target)}
        if set(values) != known:
            raise MechkitError(
                f"{folder} stores fields {sorted(values)} but {target.__name__} has {sorted(known)}; "
                "it was saved by another version of that class"
            )
        return target(**values)


# -- encoding ----------------------------------------------------------------------------------
def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


_REGISTRY[_class_key(Result)] = Result


def _lookup(module: str, name: str) -> type[Result]:
    key = f"{module}:{name}"
    if key not in _REGISTRY and module.startswith("mechkit."):  # import only mechkit's own modules
        importlib.import_module(module)
    if key not in _REGISTRY:
        raise MechkitError(f"unknown result class {name!r} from module {module!r}; import the module that defines it")
    return _REGISTRY[key]


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``value``; tensors go to ``tensors`` under their field path and leave a reference."""
    if isinstance(value, Tensor):
        key, n = path, 0
        while key in tensors:  # e.g. dict keys containing dots can repeat a path
            n += 1
            key = f"{path}#{n}"
        tensors[key] = value
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise MechkitError(f"{path}: dict keys must be str to be saved, got {[type(k).__name__ for k in value]}")
        if len(value) == 1 and next(iter(value)) in _TAGS:
            raise MechkitError(f"{path}: the key {next(iter(value))!r} is reserved by Result.save")
        return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
    raise MechkitError(
        f"{path}: cannot save a {type(value).__name__}; results hold tensors, lists, tuples, dicts, str, int, "
        "float, bool and None"
    )


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and (tag := next(iter(value))) in _TAGS:
            inner = value[tag]
            if tag == "__tensor__":
                return tensors[inner]
            return tuple(_decode(v, tensors) for v in inner) if tag == "__tuple__" else float(inner)
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b
__all__ = ["Result", "provenance"]
