"""Declarative experiments: ``mechkit run experiments/NAME.yaml``.

An experiment names a model, the data and a list of steps; each step is one analysis method with
its config — the fields of that method's Config class, so the YAML, the Python keywords and the CLI
options are one vocabulary::

    name: ioi-heads
    model: zoo:facts-lm
    backend: torch_hooks          # optional
    seeds: [0, 1]                 # optional (default [0]); each seed regenerates the data
    data: {task: ioi, n: 32, options: {corrupt: abc}}    # or {dataset: probes/truth_medium.jsonl}
    steps:
      - {name: heads, method: activation_patching, config: {sites: "blocks.*.attn.z", heads: true}}

Every config is checked before the model loads. The run folder holds ``experiment.yaml`` (the input,
verbatim), ``steps/<step>/seed-<s>/`` (the Result as ``result.json`` + ``tensors.safetensors``,
``figure.png``, ``table.csv``), ``summary.md`` / ``summary.html`` and ``manifest.json`` (versions,
hashes of the experiment, the model's weights and every result). A step whose result is complete and
whose config is unchanged is skipped, so a killed run resumes where it stopped; results depend only on
the experiment and the seeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechkit.atomic import atomic_write_text
from mechkit.config import ConfigError, read_mapping
from mechkit.errors import MechkitError

__all__ = ["METHODS", "Experiment", "Step", "run_experiment"]


@dataclass(frozen=True)
class Method:
    """How a step calls an analysis: ``function(model, data, config=...)``; ``data`` is a TaskSet or,
    for patching methods, the task's clean/corrupt pairs."""

    function: str  # "module:name"
    config: str
    data: str = "tasks"  # "tasks" | "pairs"

    def load(self) -> tuple[Callable[..., Any], type]:
        return _attr(self.function), _attr(self.config)


METHODS: dict[str, Method] = {
    "probe_sweep": Method("mechkit.probing:probe_sweep", "mechkit.probing.config:SweepConfig"),
    "activation_patching": Method("mechkit.patching.activation:activation_patching",
                                  "mechkit.patching.config:PatchConfig", "pairs"),
    "attribution_patching": Method("mechkit.patching.attribution:attribution_patching",
                                   "mechkit.patching.attribution:AttributionConfig", "pairs"),
    "path_patching": Method("mechkit.patching.path:path_patching", "mechkit.patching.path:PathPatchingConfig", "pairs"),
}

_TOP_KEYS = {"name", "model", "backend", "seeds", "data", "steps", "description"}
_DATA_KEYS = {"task", "n", "options", "dataset"}


def _attr(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Step:
    name: str
    method: str
    config: Any  # the method's Config instance


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    data: dict[str, Any]
    steps: tuple[Step, ...]
    backend: str = "torch_hooks"
    seeds: tuple[int, ...] = (0,)
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> Experiment:
        return cls.from_mapping(read_mapping(path), where=str(path))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "experiment") -> Experiment:
        unknown = sorted(set(raw) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; an experiment has {sorted(_TOP_KEYS)}")
        for key in ("name", "model", "data", "steps"):
            if key not in raw:
                raise ConfigError(f"{where}: missing {key!r}")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        return cls(name=str(raw["name"]), model=str(raw["model"]), data=_data_spec(raw["data"], where),
                   steps=_steps(raw["steps"], where), backend=str(raw.get("backend", "torch_hooks")),
                   seeds=tuple(seeds), description=str(raw.get("description", "")), source=dict(raw))

    def sha256(self) -> str:
        return _hash({"name": self.name, "model": self.model, "backend": self.backend, "seeds": list(self.seeds),
                      "data": self.data, "steps": [[s.name, s.method, s.config.to_dict()] for s in self.steps]})


def _data_spec(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping) or not set(data) <= _DATA_KEYS or ("task" in data) == ("dataset" in data):
        raise ConfigError(f"{where}: data must be {{task: NAME, n: N, options: {{...}}}} or {{dataset: FILE.jsonl}}")
    return dict(data)


def _steps(raw: Any, where: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: steps must be a non-empty list")
    steps, names = [], set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or "method" not in entry or not set(entry) <= {"name", "method", "config"}:
            raise ConfigError(f"{where}: step {i} must be {{name: ..., method: ..., config: {{...}}}}")
        method = entry["method"]
        if method not in METHODS:
            raise ConfigError(f"{where}: step {i} has unknown method {method!r}; choose one of {sorted(METHODS)}")
        name = str(entry.get("name", method))
        if name in names or "/" in name:
            raise ConfigError(f"{where}: step name {name!r} is repeated or contains '/'; give each step its own name")
        names.add(name)
        _, config_cls = METHODS[method].load()
        try:
            config = config_cls.from_dict(entry.get("config") or {})
        except ConfigError as exc:
            raise ConfigError(f"{where}: step {name!r} ({method}): {exc}") from None
        steps.append(Step(name, method, config))
    return tuple(steps)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_experiment(experiment: Experiment | str | Path, out_dir: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every step of ``experiment`` for every seed into ``out_dir`` (resuming a partial run);
    returns the manifest."""
    exp = experiment if isinstance(experiment, Experiment) else Experiment.from_file(experiment)
    out = Path(out_dir)
    say = log or (lambda _: None)
    manifest = _open_manifest(out, exp)
    import mechkit

    model = mechkit.load(exp.model, backend=exp.backend)
    manifest["model"] = {"name": exp.model, "backend": exp.backend, "fingerprint": model.parameters_fingerprint()}
    for seed in exp.seeds:
        data = None
        for step in exp.steps:
            key = f"{step.name}/seed-{seed}"
            folder = out / "steps" / step.name / f"seed-{seed}"
            if _complete(folder, manifest["steps"].get(key), step):
                say(f"{key}: done before, skipped")
                continue
            data = data if data is not None else _load_data(exp, seed)
            start = time.perf_counter()
            result = _call(step, model, data, seed, progress)
            _write_step(folder, result)
            manifest["steps"][key] = {"method": step.method, "config_sha256": _hash(step.config.to_dict()),
                                      "result_sha256": _result_hash(folder),
                                      "seconds": round(time.perf_counter() - start, 2)}
            _write_json(out / "manifest.json", manifest)
            say(f"{key}: {step.method} in {manifest['steps'][key]['seconds']} s")
    from mechkit.report.summary import write_summary

    write_summary(out, exp, manifest)
    _write_json(out / "manifest.json", manifest)
    return manifest


def _open_manifest(out: Path, exp: Experiment) -> dict[str, Any]:
    """The run folder's manifest, created or checked against this experiment."""
    path = out / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("experiment_sha256") != exp.sha256():
            raise MechkitError(f"{out} holds a run of a different experiment (its config changed); "
                               "choose a new output folder or delete this one")
        return manifest
    import torch
    import transformers

    from mechkit import __version__

    out.mkdir(parents=True, exist_ok=True)
    import yaml

    atomic_write_text(out / "experiment.yaml", yaml.safe_dump(exp.source, sort_keys=False))
    manifest = {"experiment": exp.name, "experiment_sha256": exp.sha256(),
                "versions": {"mechkit": __version__, "torch": torch.__version__,
                             "transformers": transformers.__version__, "python": platform.python_version()},
                "steps": {}}
    _write_json(path, manifest)
    return manifest


def _load_data(exp: Experiment, seed: int) -> Any:
    from mechkit import tasks

    spec = exp.data
    if "dataset" in spec:
        return tasks.TaskSet.from_jsonl(spec["dataset"])
    try:
        return tasks.generate(spec["task"], int(spec.get("n", 32)), seed, **dict(spec.get("options") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise MechkitError(f"cannot build the experiment's data {spec}: {exc}") from None


def _call(step: Step, model: Any, data: Any, seed: int, progress: bool) -> Any:
    method = METHODS[step.method]
    function, _ = method.load()
    config = step.config
    changes = {k: v for k, v in (("seed", seed), ("progress", progress)) if k in config.to_dict()}
    config = config.replace(**changes)
    if method.data == "pairs":
        from mechkit.patching import make_pairs

        data = make_pairs(model, data)
    return function(model, data, config=config)


def _write_step(folder: Path, result: Any) -> None:
    from mechkit import viz

    result.save(folder)
    with contextlib.suppress(NotImplementedError):  # a result without a table or a figure
        result.to_frame().to_csv(folder / "table.csv", index=False)
    with contextlib.suppress(NotImplementedError):
        viz.save(result.plot(), folder / "figure.png")


def _result_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("result.json", "tensors.safetensors"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _complete(folder: Path, record: dict[str, Any] | None, step: Step) -> bool:
    """The step ran to the end with this config and its files are intact."""
    if record is None or record.get("config_sha256") != _hash(step.config.to_dict()):
        return False
    try:
        return _result_hash(folder) == record.get("result_sha256")
    except OSError:
        return False


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
