"""The config pattern: one frozen dataclass per entry point is its Python keywords, its CLI options and its YAML.

Every field is declared with :func:`option`, whose ``help`` is the field's documentation: it is
appended to the class docstring, printed by ``--help`` and required (a field without it is an
error at class definition). Values are coerced and checked against the annotations in
``__post_init__`` (lists become tuples, ints become floats where a float is expected); cross-field
checks go in :meth:`Config.check`. Annotations are limited to types that survive JSON and YAML:
``bool``, ``int``, ``float``, ``str``, ``None``, ``Literal[...]``, unions of these,
``tuple[T, ...]``, ``dict[str, T]`` and nested configs::

    @dataclass(frozen=True, kw_only=True)
    class ProbeConfig(Config):
        \"\"\"How a probe sweep runs.\"\"\"

        sites: tuple[str, ...] = option(help="site names or globs to probe")
        folds: int = option(5, help="cross-validation folds")
        dtype: FloatDtype = option("float32", help="dtype of the features", convert=dtype_name)

        def check(self) -> None:
            if self.folds < 2:
                raise ConfigError(f"folds must be at least 2, got {self.folds}")

    ProbeConfig(sites=["blocks.*.resid_post"]).to_yaml()
    ProbeConfig.from_dict({"sites": ["embed"], "fold": 3})   # ConfigError: did you mean 'folds'?

Importing this module (and a config module built on it) does not import torch, so the command
line can derive its options without paying for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from mechkit.errors import MechkitError

if TYPE_CHECKING:
    import torch

FloatDtype = Literal["float16", "bfloat16", "float32", "float64"]
_MISSING: Any = dataclasses.MISSING


class ConfigError(MechkitError):
    """A config value, key or file that cannot be used."""


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into a ConfigError naming the field)."""


def option(default: Any = _MISSING, *, help: str, convert: Callable[[Any], Any] | None = None) -> Any:
    """A config field: its default (none: required), its documentation, and an optional ``convert``
    applied before type checking (e.g. :func:`dtype_name` turns ``torch.float16`` into ``"float16"``)."""
    return dataclasses.field(default=default, metadata={"help": help, "convert": convert})


def dtype_name(value: Any) -> Any:
    """``torch.float16`` → ``"float16"``; anything else unchanged (for the type check to judge)."""
    torch = sys.modules.get("torch")  # not imported: then value cannot be a torch dtype
    return str(value).removeprefix("torch.") if torch and isinstance(value, torch.dtype) else value


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` → ``torch.float16`` for a :data:`FloatDtype` name."""
    import torch

    if name not in typing.get_args(FloatDtype):
        raise ConfigError(f"dtype must be {describe(FloatDtype)}, got {name!r}")
    return getattr(torch, name)


class Config:
    """Base of frozen config dataclasses (see the module docstring for the pattern)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        lines = []
        for name, annotation in inspect.get_annotations(cls).items():
            field = cls.__dict__.get(name)
            if "ClassVar" in str(annotation):
                continue
            if not isinstance(field, dataclasses.Field) or not field.metadata.get("help"):
                raise TypeError(f"{cls.__name__}.{name} has no help text; declare it as `{name}: T = option(help=...)`")
            default = "required" if field.default is _MISSING else f"default {field.default!r}"
            lines.append(f"    {name} ({default}): {field.metadata['help']}")
        if lines:
            cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n\n    Fields:\n" + "\n".join(lines) + "\n"

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.metadata.get("convert"):
                value = field.metadata["convert"](value)
            try:
                value = _coerce(hints[field.name], value)
            except _Mismatch:
                raise ConfigError(
                    f"{type(self).__name__}.{field.name} must be {describe(hints[field.name])}, got {value!r}"
                ) from None
            object.__setattr__(self, field.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field and range checks; raise :class:`ConfigError` saying what to change."""

    # -- dicts, JSON, YAML ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON- and YAML-ready values (tuples as lists, nested configs as dicts)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a mapping; unknown keys and missing required ones are a :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a {cls.__name__} is a mapping of option names to values, got {type(data).__name__}")
        cls._check_names(data)
        missing = [n for n in cls.required() if n not in data]
        if missing:
            raise ConfigError(f"{cls.__name__} needs {', '.join(map(repr, missing))}: {cls.field_help(missing[0])}")
        return cls(**data)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (checked like :meth:`from_dict`)."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON for a {cls.__name__}: {exc}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Any:
        return cls.from_dict(_safe_yaml(text, cls.__name__))

    @classmethod
    def from_file(cls, path: str | Path) -> Any:
        """Read a ``.yaml`` / ``.yml`` / ``.json`` file."""
        return cls.from_dict(read_mapping(path))

    # -- fields -----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def field_type(cls, name: str) -> Any:
        return _hints(cls)[name]

    @classmethod
    def field_help(cls, name: str) -> str:
        return cls.fields()[name].metadata["help"]

    @classmethod
    def required(cls) -> list[str]:
        return [f.name for f in cls.fields().values() if f.default is _MISSING and f.default_factory is _MISSING]

    @classmethod
    def parse_text(cls, name: str, text: str) -> Any:
        """A value for field ``name`` from command-line text (lists are comma-separated)."""
        try:
            return _parse(cls.field_type(name), text)
        except _Mismatch:
            raise ConfigError(
                f"{cls.__name__}.{name} must be {describe(cls.field_type(name), cli=True)}, got {text!r}"
            ) from None

    @classmethod
    def _check_names(cls, data: Mapping[str, Any]) -> None:
        valid = list(cls.fields())
        for key in data:
            if key not in valid:
                near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(f"{cls.__name__} has no option {key!r}; {hint}valid options: {', '.join(valid)}")


# -- files -------------------------------------------------------------------------------------
def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file, with an error naming the file if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; pass a .yaml, .yml or .json file")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    else:
        data = _safe_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values, not {type(data).__name__}")
    return data


def _safe_yaml(text: str, what: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML ({exc})") from None


# -- types -------------------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


_SIMPLE: dict[Any, tuple[type, ...]] = {type(None): (type(None),), bool: (bool,), str: (str,), int: (int,),
                                         float: (int, float)}


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as ``tp`` (lists → tuples, ints → floats), or :class:`_Mismatch`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp in _SIMPLE:
        if isinstance(value, _SIMPLE[tp]) and (tp is bool or not isinstance(value, bool)):
            return tp(value) if tp in (int, float) else value
    elif origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
    elif _is_union(tp):
        return _first_fit(_coerce, args, value)
    elif origin is tuple and args[1:] == (Ellipsis,):
        items = value if isinstance(value, (list, tuple)) else [value]  # a lone item is a list of one
        return tuple(_coerce(args[0], v) for v in items)
    elif origin is dict and args[:1] == (str,):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: _coerce(args[1], v) for k, v in value.items()}
    elif _is_config(tp):
        return value if isinstance(value, tp) else tp.from_dict(value)
    else:
        raise TypeError(f"config fields cannot be annotated {tp!r}; use the JSON-ready types of mechkit.config")
    raise _Mismatch


def _parse(tp: Any, text: str) -> Any:
    """Command-line text → a value for ``tp`` (checked afterwards by ``_coerce``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal and text in map(str, args):
        return next(a for a in args if str(a) == text)
    if _is_union(tp):
        return _first_fit(_parse, args, text)
    if tp is type(None) and text.lower() in ("none", "null"):
        return None
    if tp is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if origin is tuple:
        return [_parse(args[0], part.strip()) for part in text.split(",") if part.strip()]
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            pass
    raise _Mismatch


def _first_fit(convert: Callable[[Any, Any], Any], members: tuple[Any, ...], value: Any) -> Any:
    """The first union member that accepts ``value``."""
    for member in members:
        try:
            return convert(member, value)
        except _Mismatch:
            pass
    raise _Mismatch


def describe(tp: Any, *, cli: bool = False) -> str:
    """A phrase for error messages, e.g. ``'all', 'last' or a list of integers``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ("one of " if len(args) > 2 else "") + _join([repr(a) for a in args])
    if _is_union(tp):
        parts = [repr(a) for m in args if typing.get_origin(m) is Literal for a in typing.get_args(m)]
        return _join(parts + [describe(m, cli=cli) for m in args if typing.get_origin(m) is not Literal])
    if origin is tuple:
        items = {int: "integers", float: "numbers", str: "strings"}.get(args[0], f"items ({describe(args[0])})")
        return f"comma-separated {items}" if cli else f"a list of {items}"
    if origin is dict:
        return f"a mapping of strings to {describe(args[1])}"
    simple = {type(None): "none", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return simple.get(tp, f"a {getattr(tp, '__name__', tp)} mapping")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def metavar(tp: Any) -> str:
    """A short placeholder for ``--help``: ``INT``, ``all|last|INT,...``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if _is_union(tp):
        return "|".join(metavar(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"{metavar(args[0])},..."
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}.get(tp, "VALUE")


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


__all__ = ["Config", "ConfigError", "FloatDtype", "describe", "dtype_name", "metavar", "option", "read_mapping",
           "torch_dtype"]
