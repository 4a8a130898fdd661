"""Atomic, durable file writes: a reader (or a crash) sees the old file or the new one, never a part.

Every writer in mechkit (store shards and manifests, zoo checkpoints, results) goes through
:func:`atomic_write`: write a temp file beside the target, fsync it, rename it over the target,
fsync the folder. Leftover temp files carry :data:`TMP_PREFIX`; :func:`clean_temp_files` removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TMP_PREFIX = ".tmp-"


def atomic_write(path: str | Path, body: Callable[[BinaryIO], Any]) -> None:
    """Write through ``body(file)`` into a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def atomic_save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically (tensors are made contiguous CPU copies)."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename durable (directory entries live in the directory's own blocks)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_temp_files(folder: str | Path) -> list[str]:
    """Remove temp files a crashed writer left behind in ``folder``; returns their names."""
    removed = []
    for path in Path(folder).glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


__all__ = [
    "TMP_PREFIX",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_temp_files",
    "fsync_dir",
]
