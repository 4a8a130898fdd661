"""Recognising TransformerLens objects and booting a Bridge over an HF model (used by ``lens.py``)."""

from __future__ import annotations

import tempfile
from typing import Any

from torch import Tensor

from mechkit.errors import UnsupportedArchitectureError
from mechkit.models.arch import table_for


def bridge_unembed(bridge: Any, model_type: str, resid: Tensor) -> Tensor:
    """Final norm + unembedding of the HF model under a Bridge (BERT: its whole MLM head)."""
    hf = bridge.original_model
    try:
        taps = table_for(model_type, type(hf).__name__).taps
    except UnsupportedArchitectureError:
        if model_type == "bert":
            raise
        return bridge.unembed(bridge.ln_final(resid))
    x = hf.get_submodule(taps["ln_final"].module)(resid) if "ln_final" in taps else resid
    return hf.get_submodule(taps["logits"].module)(x)


def n_ctx_of(tl_model: Any, flavour: str, model_type: str) -> int | None:
    """A HookedTransformer's causal-mask size; under a Bridge the HF model's learned position table (if any)."""
    if flavour == "hooked_transformer":
        return tl_model.cfg.n_ctx
    hf = tl_model.original_model
    try:
        key = table_for(model_type, type(hf).__name__).n_ctx_key
    except UnsupportedArchitectureError:
        return None
    return getattr(hf.config, key, None) if key else None


def flavour_of(tl_model: Any) -> str:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(tl_model, TransformerBridge):
        return "bridge"
    if isinstance(tl_model, HookedTransformer):
        return "hooked_transformer"
    raise UnsupportedArchitectureError(
        f"the lens backend wraps a TransformerBridge or a HookedTransformer, not {type(tl_model).__name__}; "
        f"for encoders boot a Bridge over the HF model (LensModel.from_hf(BertForMaskedLM))"
    )


def model_type_of(bridge: Any) -> str:
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    return getattr(config, "model_type", "unknown")


def tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "(unknown version)"


def folder_tokenizer(tokenizer: Any) -> Any:
    """TL's Bridge needs a tokenizer loaded from a folder; round-trip an in-memory one (or make one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is not None and getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    if tokenizer is None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
        )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
