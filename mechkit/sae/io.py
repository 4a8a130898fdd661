"""Saving and loading SAEs in sae-lens's folder format, with mechkit provenance beside it.

A folder holds what sae-lens's own ``save_model`` writes (``cfg.json`` and
``sae_weights.safetensors``, inference format: a BatchTopK SAE is saved as the JumpReLU it
becomes) plus ``mechkit.json``: the site, the model, the :class:`TrainConfig`, the sha256 of both
sae-lens files and the mechkit / sae-lens / torch versions. ``SAE.load_from_disk`` reads such a
folder unchanged; :func:`load_sae` also reads plain sae-lens folders (pretrained SAEs copied to
disk, sae-lens training checkpoints) and checks the recorded hashes when there are any.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mechkit.atomic import TMP_PREFIX, atomic_write_json, fsync_dir
from mechkit.errors import MechkitError
from mechkit.sae.config import TrainConfig

__all__ = ["PROVENANCE_FILE", "LoadedSAE", "SAEProvenance", "load_sae", "save_sae", "to_inference"]

PROVENANCE_FILE = "mechkit.json"
FORMAT = "mechkit.sae"
FORMAT_VERSION = 1
WEIGHTS, CFG, TRAINER_STATE = "sae_weights.safetensors", "cfg.json", "trainer_state.pt"  # sae-lens's names


@dataclass(frozen=True)
class SAEProvenance:
    """What ``mechkit.json`` records about a saved SAE."""

    site: str | None
    model: str | None
    train_config: TrainConfig | None
    weights_sha256: str
    versions: dict[str, str] = field(default_factory=dict)  # mechkit, sae_lens, torch
    record: dict[str, Any] = field(default_factory=dict)  # the keys of mechkit.provenance.provenance


class LoadedSAE(NamedTuple):
    """An sae-lens inference SAE and its provenance (None for a plain sae-lens folder)."""

    sae: Any
    provenance: SAEProvenance | None


def to_inference(sae: Any) -> Any:
    """The sae-lens inference SAE of a training SAE (unchanged if it is one already): the state dict
    and config sae-lens's ``save_inference_model`` would write, loaded without touching disk."""
    from sae_lens import SAE, TrainingSAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    if not isinstance(sae, TrainingSAE):
        return sae
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg = handle_config_defaulting(json.loads(json.dumps(sae.cfg.get_inference_sae_cfg_dict())))
    inference = SAE.from_dict(cfg)
    inference.process_state_dict_for_loading(state)
    inference.load_state_dict(state)
    return inference.to(sae.device).eval()


def save_sae(sae: Any, folder: str | Path, *, site: str | None = None, model: Any = None,
             config: TrainConfig | None = None) -> Path:
    """Write ``sae`` (an sae-lens SAE, training or inference) to ``folder`` as sae-lens saves it, plus
    ``mechkit.json``. ``model``: a wrapped mechkit Model, a provenance mapping (e.g. a store's
    ``provenance``) or a name. The files appear together: they are written beside the folder first."""
    from sae_lens import SAE, TrainingSAE

    if not isinstance(sae, SAE):
        raise MechkitError(f"save_sae saves sae-lens SAEs, got a {type(sae).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    folder = Path(folder)
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / CFG).is_file()):
        raise MechkitError(f"{folder} exists and does not hold an SAE; choose a new or empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{TMP_PREFIX}{folder.name}-"))
    try:
        if isinstance(sae, TrainingSAE):
            sae.save_inference_model(staging)
        else:
            sae.save_model(staging)
        site = site if site is not None else getattr(sae.cfg.metadata, "hook_name", None)
        atomic_write_json(staging / PROVENANCE_FILE, _record(staging, site, model, config))
        folder.mkdir(exist_ok=True)
        (folder / PROVENANCE_FILE).unlink(missing_ok=True)  # never a stale record beside new weights
        for name in (WEIGHTS, CFG, PROVENANCE_FILE):
            os.replace(staging / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_sae(folder: str | Path, *, device: str = "cpu") -> LoadedSAE:
    """The sae-lens inference SAE in ``folder`` and its mechkit provenance (None when the folder has no
    ``mechkit.json``). A sae-lens training checkpoint loads as the inference SAE it saves as."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MechkitError(f"no SAE folder at {folder}; pass the folder that holds {CFG} and {WEIGHTS}")
    for name in (CFG, WEIGHTS):
        if not (folder / name).is_file():
            raise MechkitError(f"{folder} has no {name}, so it is not an sae-lens SAE folder; point to the folder "
                               f"that holds {CFG} and {WEIGHTS}")
    cfg = _read_json(folder / CFG, "restore it or save the SAE again")
    provenance = _read_provenance(folder)
    _check_weights(folder / WEIGHTS)
    try:
        sae = _load(folder, cfg, device)
    except Exception as e:  # wrong shapes, unknown architecture, fields this sae-lens does not know
        raise MechkitError(f"sae-lens cannot load the SAE in {folder} ({type(e).__name__}: {e}); check that {CFG} "
                           f"matches {WEIGHTS} and that it was written by a compatible sae-lens version") from e
    return LoadedSAE(sae.eval(), provenance)


# -- writing ------------------------------------------------------------------------------------
def _record(staging: Path, site: str | None, model: Any, config: TrainConfig | None) -> dict[str, Any]:
    import sae_lens
    import torch

    from mechkit import __version__
    from mechkit.provenance import provenance

    if model is None or isinstance(model, str):
        record = provenance(None, [site] if site else None) | ({"model": model} if model else {})
    elif isinstance(model, Mapping):
        record = dict(model) | ({"sites": [site]} if site else {})
    else:
        record = provenance(model, [site] if site else None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "site": site,
        "model": record.get("model"),
        "train_config": None if config is None else config.to_dict(),
        "sha256": {name: sha256(staging / name) for name in (WEIGHTS, CFG)},
        "versions": {"mechkit": __version__, "sae_lens": sae_lens.__version__, "torch": torch.__version__},
        "provenance": record,
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------
def _read_json(path: Path, remedy: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MechkitError(f"{path} is unreadable ({e}): the file is truncated or corrupt; {remedy}") from e
    if not isinstance(data, dict):
        raise MechkitError(f"{path} holds a {type(data).__name__}, not a mapping; {remedy}")
    return data


def _read_provenance(folder: Path) -> SAEProvenance | None:
    path = folder / PROVENANCE_FILE
    if not path.exists():
        return None
    remedy = "restore it, or delete it to load the folder as a plain sae-lens SAE (without provenance)"
    data = _read_json(path, remedy)
    if data.get("format") != FORMAT or not isinstance(data.get("sha256"), dict):
        raise MechkitError(f"{path} is not a mechkit SAE record; {remedy}")
    for name, expected in data["sha256"].items():
        if (folder / name).is_file() and sha256(folder / name) != expected:
            raise MechkitError(f"{folder / name} does not match the sha256 recorded in {path}: the file was truncated "
                               "or changed after saving; restore it or save the SAE again")
    config = data.get("train_config")
    return SAEProvenance(site=data.get("site"), model=data.get("model"),
                         train_config=None if config is None else TrainConfig.from_dict(config),
                         weights_sha256=data["sha256"].get(WEIGHTS, ""), versions=dict(data.get("versions", {})),
                         record=dict(data.get("provenance", {})))


def _check_weights(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_slice(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise MechkitError(f"{path} cannot be read ({e}): the file is truncated or corrupt; restore it or save the "
                           "SAE again") from e


def _load(folder: Path, cfg: dict[str, Any], device: str) -> Any:
    from sae_lens import SAE, TrainingSAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if (folder / TRAINER_STATE).is_file() or cfg.get("architecture") not in SAE_CLASS_REGISTRY:
        return to_inference(TrainingSAE.load_from_disk(folder, device=device))  # an sae-lens training checkpoint
    return SAE.load_from_disk(folder, device=device)
