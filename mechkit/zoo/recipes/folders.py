"""Writing trained weights as ordinary HF model folders, atomically.

Temp files and folders carry :data:`mechkit.atomic.TMP_PREFIX`, so that
:func:`mechkit.zoo.recipes.loop.remove_partial_writes` finds whatever a killed run left behind.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mechkit import atomic


def write_hf_folder(folder: Path, state: dict, config, tokenizer_dir: Path, dtype: torch.dtype) -> None:
    """Write config, weights (as ``dtype``) and tokenizer files into ``folder``, replacing it as a
    whole. config.json says float32, so loading computes in fp32 whatever the stored dtype."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=atomic.TMP_PREFIX, dir=folder.parent))
    try:
        cfg = copy.deepcopy(config)
        cfg.dtype = "float32"
        cfg.architectures = [_model_class(cfg)]
        cfg.save_pretrained(tmp)
        atomic.atomic_save_safetensors({k: v.to(dtype) for k, v in state.items()}, tmp / "model.safetensors",
                                       metadata={"format": "pt"})
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
        _make_public(tmp)
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_hf_files(out: Path, state: dict, config, tokenizer_dir: Path) -> None:
    """The fp32 model files of a finished run, each moved into ``out`` beside the files already there
    (card, checkpoints), every file replaced atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=atomic.TMP_PREFIX, dir=out))
    try:
        write_hf_folder(tmp / "model", state, config, tokenizer_dir, torch.float32)
        for f in (tmp / "model").iterdir():
            f.replace(out / f.name)
        atomic.fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(path: Path) -> None:
    """Make a written file readable by everyone, like any checkpoint (temp files are private)."""
    path.chmod(0o644)


def _make_public(folder: Path) -> None:
    folder.chmod(0o755)
    for f in folder.iterdir():
        if f.is_file():
            publish(f)


def _model_class(config) -> str:
    # GPT2Config -> GPT2LMHeadModel, LlamaConfig -> LlamaForCausalLM, ...
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an older copy (moved aside first, then deleted)."""
    if target.exists():
        trash = target.with_name(f"{atomic.TMP_PREFIX}old-{target.name}-{os.getpid()}")
        os.rename(target, trash)
        os.rename(tmp, target)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, target)
    atomic.fsync_dir(target.parent)
