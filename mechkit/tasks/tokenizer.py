"""A word-level tokenizer over the fixed vocabulary of the synthetic tasks.

One token per word and one per punctuation mark, so every entity, color, number and answer is a
single token and clean/corrupt pairs that swap words have equal length by construction. Saved as
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, the folder loads with
``transformers.AutoTokenizer.from_pretrained`` as a fast tokenizer, like any checkpoint's.
Encoding with special tokens prepends ``<bos>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, processors

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3 in this order
MAX_NUMBER = 128  # numbers 0..127 are words, enough for modular addition with p = 113 or 127


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Punctuation(behavior="isolated")])


def split_words(text: str) -> list[str]:
    """The words the tokenizer sees in ``text`` (placeholders such as ``{s}`` are dropped)."""
    pieces = _pre_tokenizer().pre_tokenize_str(text)
    out, depth = [], 0
    for word, _ in pieces:
        # Template placeholders arrive as "{", "s", "}" pieces; skip what lies between braces.
        if word == "{":
            depth += 1
        elif word == "}":
            depth -= 1
        elif depth == 0:
            out.append(word)
    return out


def vocabulary() -> list[str]:
    """Every word the task generators can write, in a stable order (specials excluded)."""
    from . import analogies, colored_objects, concepts, ioi, two_hop, world

    texts = [*world.VOCAB_TEXT, *ioi.VOCAB_TEXT, *colored_objects.VOCAB_TEXT, *two_hop.VOCAB_TEXT,
             *concepts.VOCAB_TEXT, *analogies.VOCAB_TEXT, "+", "=", "?", ",", ".", ":"]
    words = [w for text in texts for w in split_words(text)]
    words += [str(i) for i in range(MAX_NUMBER)]
    return list(dict.fromkeys(words))


def build_tokenizer(words: Iterable[str] | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` over ``words`` (default: :func:`vocabulary`)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary() if words is None else words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(folder: str | Path, words: Iterable[str] | None = None,
                   model_max_length: int = 512) -> Path:
    """Write the three tokenizer files into ``folder`` (created if needed) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(words).save(str(folder / "tokenizer.json"))
    specials = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
                              **specials}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", specials)
    return folder


def load_tokenizer(folder: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``: the same path any checkpoint's tokenizer takes."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
