"""Modular arithmetic in its own token vocabulary: the task the grokking zoo models are trained on.

Unlike :mod:`mechkit.tasks.modadd` (word-level text prompts), every residue here is one token whose
id is its value, and the whole task is a tensor: ``make_data(task)`` gives every example in a fixed
order with the seeded train/test split. Analyses of ``modadd-grok`` / ``moe-grok`` rebuild the
exact training split from the ``task`` recorded in the model's card::

    task = ModArithTask.from_dict(card["task"])
    data = make_data(task)           # data.tokens [N, T], data.labels [N], data.train [N]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
OPS = {"+": lambda a, b, p: (a + b) % p, "-": lambda a, b, p: (a - b) % p, "*": lambda a, b, p: (a * b) % p}


@dataclass(frozen=True)
class ModArithTask:
    """(a op b) mod p for every pair (a, b) and every op; a seeded fraction of examples trains."""

    p: int = 59
    """Modulus; the numbers 0..p-1 are single tokens."""
    ops: tuple[str, ...] = ("+",)
    """Operations. One op: prompts ``"a b ="``; several: ``"a op b ="``."""
    train_frac: float = 0.3
    """Fraction of all examples (over all ops) used for training; the rest is the test set."""
    seed: int = 0
    """Seed of the train/test split."""
    shuffle_seed: int | None = None
    """If set, the training labels are permuted once among the training examples with this seed (a
    label-shuffled control: memorisable, nothing to generalise); test labels stay true."""

    def __post_init__(self) -> None:
        if self.p < 2:
            raise ValueError(f"p must be >= 2, got {self.p}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {sorted(OPS)}, got {self.ops}")
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {self.train_frac}")

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id: numbers first (id = value), then "=", the op tokens (several ops), specials."""
        words = [str(i) for i in range(self.p)] + ["="]
        if len(self.ops) > 1:
            words += list(self.ops)
        return {w: i for i, w in enumerate([*words, *SPECIALS])}

    def special_ids(self) -> dict[str, int]:
        """The ids a model config needs (``pad_token_id``, ``bos_token_id``, ``eos_token_id``)."""
        v = self.vocab
        return {"pad_token_id": v["<pad>"], "bos_token_id": v["<bos>"], "eos_token_id": v["<eos>"]}

    def to_dict(self) -> dict:
        d = {**asdict(self), "ops": list(self.ops)}
        if self.shuffle_seed is None:  # the cards and run specs of unshuffled tasks stay as they were
            del d["shuffle_seed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModArithTask:
        return cls(p=d["p"], ops=tuple(d["ops"]), train_frac=d["train_frac"], seed=d["seed"],
                   shuffle_seed=d.get("shuffle_seed"))


@dataclass(frozen=True)
class ModArithData:
    tokens: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N] long, the answer token id (= its value)
    op: torch.Tensor  # [N] long, index into task.ops
    train: torch.Tensor  # [N] bool


def make_data(task: ModArithTask, train_mask: torch.Tensor | None = None) -> ModArithData:
    """All examples of ``task`` in a fixed order (op-major, then a, then b) and the split. A stored
    ``train_mask`` (from a model folder) overrides the seeded split. With ``task.shuffle_seed`` the
    training labels are permuted among the training examples (``data.labels`` then holds them)."""
    p, vocab = task.p, task.vocab
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    eq = torch.full_like(a, vocab["="])
    tokens, labels, ops = [], [], []
    for i, op in enumerate(task.ops):
        cols = [a, b, eq] if len(task.ops) == 1 else [a, torch.full_like(a, vocab[op]), b, eq]
        tokens.append(torch.stack(cols, 1))
        labels.append(OPS[op](a, b, p))
        ops.append(torch.full_like(a, i))
    tokens, labels, op_idx = torch.cat(tokens), torch.cat(labels), torch.cat(ops)
    if train_mask is None:
        gen = torch.Generator().manual_seed(task.seed)
        perm = torch.randperm(len(labels), generator=gen)
        train_mask = torch.zeros(len(labels), dtype=torch.bool)
        train_mask[perm[: int(task.train_frac * len(labels))]] = True
    if train_mask.shape != labels.shape:
        raise ValueError(f"train mask has shape {tuple(train_mask.shape)}, expected {tuple(labels.shape)}")
    train_mask = train_mask.bool()
    if task.shuffle_seed is not None:
        rows = train_mask.nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(task.shuffle_seed)
        labels = labels.clone()
        labels[rows] = labels[rows[torch.randperm(len(rows), generator=gen)]]
    return ModArithData(tokens, labels, op_idx, train_mask)


def prompts(task: ModArithTask, data: ModArithData) -> list[str]:
    """The examples as text (what the task's tokenizer maps back to ``data.tokens``)."""
    inv = {i: w for w, i in task.vocab.items()}
    return [" ".join(inv[int(t)] for t in row) for row in data.tokens]


def save_tokenizer(task: ModArithTask, folder: str | Path) -> None:
    """A WordLevel tokenizer over the task's vocabulary, loadable with ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(task.vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(str(folder))
