"""Saving and loading fitted probes: ``probe.safetensors`` + ``probe.json``, never pickle.

Every probe kind (linear, attentive, hyperdimensional) stores its tensors and a JSON document of
plain values under a ``kind`` tag; :func:`load_artifact` checks the tag, the format number and
the tensors' sha256, so a folder left half-written by a crash is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from mechkit import __version__
from mechkit.atomic import atomic_write_bytes, atomic_write_json
from mechkit.errors import MechkitError

TENSORS, DOCUMENT = "probe.safetensors", "probe.json"
FORMAT = 1


def save_artifact(folder: str | Path, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` (JSON types only) to ``folder``; the JSON file goes last."""
    from safetensors.torch import save

    folder = Path(folder)
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(folder / TENSORS, blob)
    atomic_write_json(folder / DOCUMENT, {
        "format": FORMAT, "kind": kind, "mechkit_version": __version__,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(), "meta": meta,
    })
    return folder


def load_artifact(folder: str | Path, kind: str | None = None) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """``(kind, tensors, meta)`` read back from ``folder``; ``kind`` given → it must match."""
    from safetensors.torch import load

    folder = Path(folder)
    doc_path, tensor_path = folder / DOCUMENT, folder / TENSORS
    if not doc_path.is_file() or not tensor_path.is_file():
        raise MechkitError(f"{folder} is not a saved probe: expected {DOCUMENT} and {TENSORS} in it")
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MechkitError(f"{doc_path} is not valid JSON ({err}); save the probe again") from err
    if doc.get("format") != FORMAT:
        raise MechkitError(f"{doc_path} has format {doc.get('format')!r}; this mechkit reads format {FORMAT}")
    if kind is not None and doc.get("kind") != kind:
        raise MechkitError(f"{folder} holds a {doc.get('kind')!r} probe, not a {kind!r} one")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise MechkitError(f"{tensor_path} does not match the checksum in {DOCUMENT} (an interrupted save or a "
                           "corrupted file); save the probe again")
    return doc["kind"], load(blob), doc.get("meta", {})
