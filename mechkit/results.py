"""The Result base class: what every analysis returns.

A result is a frozen dataclass of tensors and plain values plus ``provenance`` (model, backend,
sites, seeds, mechkit version) and ``config`` (the ``to_dict()`` of the config that produced it).
It shows itself as a tidy frame (``to_frame``) and a figure (``plot``, drawn by ``_plot`` with the
helpers of :mod:`mechkit.viz`) and saves to a folder as ``tensors.safetensors`` + ``result.json``
— never pickle::

    @dataclass(frozen=True, eq=False)
    class ProbeSweepResult(Result):
        accuracy: Tensor          # [layers]
        layers: list[int]

        def to_frame(self):
            return pd.DataFrame({"layer": self.layers, "accuracy": self.accuracy.tolist()})

        def _plot(self, fig):
            ax = fig.add_subplot()
            ax.plot(self.layers, self.accuracy.tolist(), marker="o")
            viz.label(ax, x="layer", y="probe accuracy")

    ProbeSweepResult(torch.rand(3), [0, 1, 2], config=config.to_dict(),
                     provenance=provenance(model, sites, seed=0))
    Result.load(folder)   # → a ProbeSweepResult

Rules a subclass inherits:

- ``@dataclass(frozen=True, eq=False)`` is required and checked as the decorator runs (a
  ``TypeError`` otherwise): ``eq=True`` would compare tensor fields with ``==`` and make
  instances unhashable. Results compare by identity; :meth:`Result.equals` compares contents.
- Subclasses register themselves by definition; ``Result.load`` rebuilds the recorded class.
- Loading tolerates an older version of the class: a field missing from the file takes its
  default (an error names it when it has none); a saved field the class no longer has is
  dropped with a ``UserWarning`` naming it.
- ``save`` writes both files atomically, ``result.json`` last; it records the sha256 of the
  tensors file, so a folder left inconsistent by an interrupted save is refused on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechkit.atomic import atomic_write_bytes, atomic_write_text
from mechkit.errors import MechkitError
from mechkit.provenance import provenance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TENSORS, RESULT = "tensors.safetensors", "result.json"
FORMAT = 1  # layout of result.json (not of any one class's fields); a reader refuses other numbers
_TAGS = ("__tensor__", "__tuple__", "__float__")
_REGISTRY: dict[str, type[Result]] = {}


class _ResultType(type):
    """Checks the ``@dataclass`` options of every Result class as the decorator applies them.

    ``__init_subclass__`` runs before the decorator and cannot see its options; the decorator's
    first act is to set ``__dataclass_params__`` on the class, which passes through here.
    """

    def __setattr__(cls, name: str, value: Any) -> None:
        if name == "__dataclass_params__" and (value.eq or not value.frozen):
            raise TypeError(
                f"{cls.__qualname__}: declare Result subclasses with @dataclass(frozen=True, eq=False); "
                "eq=True compares tensor fields with == and leaves instances unhashable, and a result must "
                "not change after it is made. Compare contents with result.equals(other)"
            )
        super().__setattr__(name, value)


@dataclasses.dataclass(frozen=True, eq=False)
class Result(metaclass=_ResultType):
    """Base of all analysis results. Subclass with ``@dataclass(frozen=True, eq=False)``."""

    provenance: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)
    """What produced the result (:func:`mechkit.provenance.provenance`)."""
    config: dict[str, Any] | None = dataclasses.field(default=None, kw_only=True)
    """The ``to_dict()`` of the config that produced the result; None when there was none."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[_class_key(cls)] = cls

    # -- presentation (subclasses override to_frame and _plot) ------------------------------
    def to_frame(self) -> Any:
        """A tidy pandas DataFrame: one row per observation, one column per variable."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define to_frame(); read its fields directly "
            f"({', '.join(f.name for f in dataclasses.fields(self))}) or implement to_frame() in the subclass"
        )

    def plot(self, **kwargs: Any) -> Figure:
        """A matplotlib Figure of the result: a :func:`mechkit.viz.figure` that ``_plot`` draws into.

        Keywords go to ``_plot``. In a notebook the figure shows as the cell's value; elsewhere
        save it with :func:`mechkit.viz.save`.
        """
        if type(self)._plot is Result._plot:
            raise NotImplementedError(
                f"{type(self).__name__} does not define _plot(fig); use to_frame() and plot the frame, "
                "or implement _plot in the subclass with the helpers of mechkit.viz"
            )
        from mechkit import viz  # matplotlib loads on the first plot, not on import

        fig = viz.figure()
        self._plot(fig, **kwargs)
        return fig

    def _plot(self, fig: Figure, **kwargs: Any) -> None:
        """Draw the result into ``fig`` (add axes with ``fig.add_subplot()``; label them with
        :func:`mechkit.viz.label`). Subclasses override this, not :meth:`plot`."""
        raise NotImplementedError

    # -- comparison -------------------------------------------------------------------------
    def equals(self, other: Any) -> bool:
        """Same class and equal fields (tensors compared with ``torch.equal``, dtype included)."""
        return type(self) is type(other) and all(
            _equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``tensors.safetensors`` and ``result.json`` into ``folder`` (created if needed)."""
        from safetensors.torch import save

        from mechkit import __version__

        folder = Path(folder)
        tensors: dict[str, Tensor] = {}
        fields = {f.name: _encode(getattr(self, f.name), f.name, tensors) for f in _init_fields(type(self))}
        # clone: safetensors refuses tensors sharing memory, and views of larger tensors
        blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        document = {"format": FORMAT, "class": type(self).__qualname__, "module": type(self).__module__,
                    "mechkit_version": __version__, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                    "fields": fields}
        text = json.dumps(document, indent=1, allow_nan=False)  # validates before anything is written
        atomic_write_bytes(folder / TENSORS, blob)
        atomic_write_text(folder / RESULT, text + "\n")  # last: a result.json always has its tensors
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Result:
        """Rebuild a saved result as its recorded subclass (which must be importable)."""
        folder = Path(folder)
        document = _read_document(folder)
        target = _lookup(document.get("module", ""), document.get("class", ""))
        if not issubclass(target, cls):
            raise MechkitError(f"{folder} holds a {target.__name__}, not a {cls.__name__}")
        tensors = _read_tensors(folder, document)
        stored = {name: _decode(value, tensors, folder) for name, value in document["fields"].items()}
        return target(**_matching_fields(target, stored, folder))


# -- reading -----------------------------------------------------------------------------------
def _read_document(folder: Path) -> dict[str, Any]:
    from mechkit import __version__

    path = folder / RESULT
    if not path.is_file():
        raise MechkitError(f"{folder} holds no {RESULT}; point to a folder written by Result.save")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MechkitError(f"{path} is not valid JSON ({exc}); save the result again") from exc
    number = document.get("format") if isinstance(document, dict) else None
    if isinstance(number, int) and number > FORMAT:
        raise MechkitError(
            f"{path} is result format {number}, written by a newer mechkit; mechkit {__version__} reads "
            f"format {FORMAT}: upgrade mechkit to load it"
        )
    if number != FORMAT or not isinstance(document.get("fields"), dict):
        raise MechkitError(
            f"{path} is not a mechkit result (format {number!r}); point to a folder written by Result.save"
        )
    return document


def _read_tensors(folder: Path, document: dict[str, Any]) -> dict[str, Tensor]:
    from safetensors.torch import load

    path = folder / TENSORS
    if not path.is_file():
        return {}
    blob = path.read_bytes()
    expected = document.get("tensors_sha256")
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise MechkitError(
            f"{path} does not belong to {folder / RESULT} (an interrupted or concurrent save?); save the result again"
        )
    return load(blob)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a constructor takes: the ones saved and restored (``init=False`` ones are derived)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _matching_fields(target: type[Result], stored: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``stored`` fitted to the class as it is now: unknown fields dropped (warned), missing ones defaulted."""
    fields = {f.name: f for f in _init_fields(target)}
    unknown = sorted(set(stored) - set(fields))
    if unknown:
        warnings.warn(
            f"{folder}: {target.__name__} has no field {', '.join(map(repr, unknown))} any more (saved by another "
            "version of the class); the saved value is dropped",
            UserWarning, stacklevel=3,
        )
    missing = [name for name, f in fields.items() if name not in stored
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MechkitError(
            f"{folder} has no value for {target.__name__} field {', '.join(map(repr, missing))}, which has no default "
            "(saved by an older version of the class); give the field a default or run the analysis again"
        )
    return {name: value for name, value in stored.items() if name in fields}


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
    hint = "; store its to_dict()" if callable(getattr(value, "to_dict", None)) else ""
    raise MechkitError(
        f"{path}: cannot save a {type(value).__name__}{hint}; results hold tensors, lists, tuples, dicts, str, int, "
        "float, bool and None"
    )


def _decode(value: Any, tensors: dict[str, Tensor], folder: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, folder) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and (tag := next(iter(value))) in _TAGS:
            inner = value[tag]
            if tag == "__tensor__":
                if inner not in tensors:
                    raise MechkitError(f"{folder}: {RESULT} refers to tensor {inner!r}, missing from {TENSORS}; "
                                       "save the result again")
                return tensors[inner]
            return tuple(_decode(v, tensors, folder) for v in inner) if tag == "__tuple__" else float(inner)
        return {k: _decode(v, tensors, folder) for k, v in value.items()}
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        # NaN marks a missing cell (e.g. a position no prompt has): equal to NaN in the same place
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        same = torch.eq(a, b)
        return bool((same | (a.isnan() & b.isnan()) if a.is_floating_point() else same).all())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


__all__ = ["FORMAT", "RESULT", "TENSORS", "Result", "provenance"]
