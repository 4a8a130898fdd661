"""Wrap model objects, HF ids and local folders (``mechkit.load`` adds ``"zoo:NAME"`` above this layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechkit.errors import MechkitError
from mechkit.models.base import Model

BACKENDS = ("torch_hooks", "lens", "nnsight")


def load(
    model: Any,
    *,
    backend: str = "torch_hooks",
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    remote: bool = False,
    name: str | None = None,
    **kwargs: Any,
) -> Model:
    """Wrap ``model`` for analysis.

    ``model`` may be a wrapped :class:`Model` (returned as is), an ``nn.Module`` (HF or plain), a
    TransformerLens ``HookedTransformer`` / ``TransformerBridge``, an nnsight ``LanguageModel`` /
    ``NNsight``, a local HF folder or an HF hub id (needs hub access). ``name`` is how provenance
    names a model given by folder or id (default: the folder or id).

    ``backend`` picks the hooking library for models given by name or folder. Models are loaded in
    ``dtype`` with eager attention by default so that ``attn.pattern`` sites exist. ``remote=True``
    (nnsight backend) runs traces on NDIF; it needs an NDIF API key configured for nnsight.
    """
    if isinstance(model, Model):
        return model
    if backend not in BACKENDS:
        raise MechkitError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if remote and backend != "nnsight":
        raise MechkitError("remote=True runs on NDIF through nnsight: pass backend='nnsight'")
    wrapped = _wrap_object(model, tokenizer, remote)
    if wrapped is not None:
        return wrapped
    if not isinstance(model, (str, Path)):
        raise TypeError(
            "mechkit.load expects a model object, a folder, an HF id or 'zoo:NAME'; "
            f"got {type(model).__name__}"
        )
    source = str(model)
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise MechkitError(f"no model folder at {source!r}")
    source = str(Path(source).expanduser()) if source.startswith("~") else source
    return _load_pretrained(source, name or source, backend, tokenizer, dtype, attn_implementation, remote, kwargs)


def _wrap_object(obj: Any, tokenizer: Any, remote: bool) -> Model | None:
    kind = type(obj).__module__.split(".")[0]
    if kind == "transformer_lens":
        from mechkit.models.lens import LensModel

        return LensModel(obj, tokenizer=tokenizer)
    if kind == "nnsight":
        from mechkit.models.nnsight import NNsightModel

        return NNsightModel(obj, tokenizer=tokenizer, remote=remote)
    if isinstance(obj, torch.nn.Module):
        from mechkit.models.torch_hooks import TorchHooksModel

        return TorchHooksModel(obj, tokenizer)
    return None


def _load_pretrained(
    path: str,
    name: str,
    backend: str,
    tokenizer: Any,
    dtype: torch.dtype,
    attn_implementation: str,
    remote: bool,
    kwargs: dict,
) -> Model:
    import transformers

    if backend == "nnsight" and remote:
        from mechkit.models.nnsight import NNsightModel

        return NNsightModel.remote(path, name=name, **kwargs)
    config = _hf_config(path)
    auto = _auto_class(config)
    hf = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    hf.eval()
    if tokenizer is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # token ids still work; texts raise a clear error
    if backend == "torch_hooks":
        from mechkit.models.torch_hooks import TorchHooksModel

        return TorchHooksModel(hf, tokenizer, name=name)
    if backend == "lens":
        from mechkit.models.lens import LensModel

        return LensModel.from_hf(hf, tokenizer, name=name)
    from mechkit.models.nnsight import NNsightModel

    return NNsightModel.from_hf(hf, tokenizer, name=name)


def _hf_config(path: str) -> Any:
    """The transformers config of a folder or hub id; a folder without a usable config.json is a clear error."""
    import transformers

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise MechkitError(
            f"{path} has no config.json, so it is not a Hugging Face model folder: save the model into it with "
            "model.save_pretrained(folder), or pass the loaded nn.Module to mechkit.load"
        )
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as exc:
        if not folder.is_dir():
            raise  # a hub id: transformers names what it could not find
        raise MechkitError(
            f"{folder / 'config.json'} is not a usable transformers config ({exc}). It must be valid JSON with a "
            "'model_type' this transformers version knows (e.g. \"gpt2\", \"llama\"); write it with "
            "config.save_pretrained(folder)"
        ) from exc


def _auto_class(config: Any) -> Any:
    import transformers

    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs:
        return transformers.AutoModelForMaskedLM
    if "CausalLM" in archs or "LMHead" in archs:
        return transformers.AutoModelForCausalLM
    if getattr(config, "model_type", "") == "bert" or not archs:
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM
