"""Durable shard files for the activation store: streamed, hashed, atomic safetensors writes.

A shard is written straight from the buffered per-batch tensors into a temporary file in the
store folder, hashed while it is written, fsynced and then renamed into place. Writing the
safetensors layout here (8-byte header length, JSON header, raw little-endian bytes) avoids
concatenating the buffer first, which would double the memory a shard needs. Reading always goes
through ``safetensors.safe_open``, which validates the layout.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.atomic import atomic_write

SHARD_PATTERN = "shard-{:05d}.safetensors"
TOKENS, PROMPT, POSITION = "_tokens", "_prompt", "_position"  # site names never start with "_"
_HASH_CHUNK = 1 << 22

SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int32: "I32",
    torch.int64: "I64",
}


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one shard."""

    file: str
    tokens: int
    bytes: int
    sha256: str
    prompts: tuple[int, int]  # [start, end) of the prompt indices whose rows this shard holds

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "tokens": self.tokens, "bytes": self.bytes, "sha256": self.sha256,
                "prompts": list(self.prompts)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardInfo:
        return cls(str(data["file"]), int(data["tokens"]), int(data["bytes"]), str(data["sha256"]),
                   (int(data["prompts"][0]), int(data["prompts"][1])))


def write_shard(
    folder: Path, name: str, columns: Mapping[str, Sequence[Tensor]], metadata: Mapping[str, str]
) -> tuple[int, str]:
    """Write ``{column: row pieces}`` as one safetensors file, atomically. Returns (bytes, sha256).

    Each column is stored as the concatenation of its pieces along the first axis; the pieces are
    streamed one after another, never concatenated in memory.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; raw bytes are written as they are
        raise RuntimeError("writing activation shards needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in sorted(columns):
        pieces = columns[key]
        first = pieces[0]
        shape = [sum(p.shape[0] for p in pieces), *first.shape[1:]]
        size = sum(p.numel() for p in pieces) * first.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[first.dtype], "shape": shape,
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
    digest = hashlib.sha256()

    def emit(f: Any, data: Any) -> None:
        digest.update(data)
        f.write(data)

    def body(f: Any) -> None:
        emit(f, struct.pack("<Q", len(blob)))
        emit(f, blob)
        for key in sorted(columns):
            for piece in columns[key]:
                emit(f, memoryview(_raw_bytes(piece)))

    atomic_write(folder / name, body)
    return 8 + len(blob) + offset, digest.hexdigest()


def _raw_bytes(tensor: Tensor) -> Any:
    """A zero-copy uint8 numpy view of a CPU tensor's memory."""
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
