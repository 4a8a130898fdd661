"""Shard integrity: a structural check on every read, a sha256 check the first time a process reads a shard.

A flipped byte inside a shard's data leaves its size and header intact, so only the hash finds it.
Hashing costs one sequential read of the file (see bench/RESULTS.md), so it is done once per
process and file version: a verified shard is remembered by path, inode, size and modification
time (any rewrite changes one of them) together with the sha256 the manifest expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from mechkit.activations.shards import POSITION, PROMPT, TOKENS, ShardInfo, sha256_file

REPAIR = ("re-run collect(...) with the same arguments (resume=True, the default): it re-collects this shard "
          "and the ones after it")

_verified: set[tuple[Any, ...]] = set()


def shard_problem(folder: Path, shard: ShardInfo, manifest: dict[str, Any], *, rehash: bool = False) -> str | None:
    """What is wrong with one shard (missing, resized, bad header, wrong sha256), or None.

    ``folder`` should be resolved (absolute), since it keys the memory of verified shards;
    ``rehash`` hashes the file even if this process has verified it before.
    """
    file = folder / shard.file
    try:
        stat = os.stat(file)
    except FileNotFoundError:
        return "is missing"
    if stat.st_size != shard.bytes:
        return f"has {stat.st_size} bytes but the manifest recorded {shard.bytes} (truncated or overwritten)"
    key = (str(file), stat.st_ino, stat.st_size, stat.st_mtime_ns, shard.sha256)
    if key in _verified and not rehash:
        return None
    problem = _layout_problem(file, shard, manifest)
    if problem is None:
        actual = sha256_file(file)
        if actual != shard.sha256:
            return f"is corrupted: its sha256 is {actual[:12]}…, the manifest recorded {shard.sha256[:12]}…"
        _verified.add(key)
    return problem


def _layout_problem(file: Path, shard: ShardInfo, manifest: dict[str, Any]) -> str | None:
    """The safetensors header lists exactly the tensors and shapes the manifest describes."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        return f"has an unreadable safetensors header ({exc})"
    expected = {TOKENS: [shard.tokens], PROMPT: [shard.tokens], POSITION: [shard.tokens]}
    expected |= {s: [shard.tokens, int(manifest["d"][s])] for s in manifest["sites"]}
    if shapes != expected:
        return f"holds tensors {shapes}, not the {expected} the manifest describes"
    return None
