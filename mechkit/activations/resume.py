"""Continuing a store: check that a call matches the store's settings, then drop what is damaged.

A store is continued only by a call that would produce the same tensors (same model, backend,
sites, positions, dtype, batch size, token budget and prompts). Before continuing, every listed
shard is checked — including its sha256, so a flipped byte is found — and the first damaged
shard and all later ones are dropped: collection restarts at that shard's first prompt.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mechkit.activations.integrity import shard_problem
from mechkit.activations.shards import SHARD_PATTERN, ShardInfo
from mechkit.activations.store import MANIFEST, read_manifest
from mechkit.atomic import TMP_PREFIX, atomic_write_json, clean_temp_files
from mechkit.errors import StoreError

# Settings that must match to resume: any of them changes the tensors a run produces.
RESUME_FIELDS = (
    "model_fingerprint", "backend", "sites", "positions", "dtype", "batch_size", "token_budget",
    "n_prompts", "prompts_sha256",
)


def config_mismatch(manifest: dict[str, Any], fields: dict[str, Any]) -> str | None:
    """A sentence naming every setting in which ``fields`` differ from the store's, or None."""
    problems = []
    for field in RESUME_FIELDS:
        old, new = manifest.get(field), fields[field]
        if old == new:
            continue
        if field == "model_fingerprint":
            problems.append(
                f"it was written by another model: {manifest.get('model')!r} (parameters fingerprint "
                f"{str(old)[:12]}…), this is {fields['model']!r} ({str(new)[:12]}…)"
            )
        elif field == "prompts_sha256":
            problems.append("the prompt list differs (same length, other content)")
        else:
            problems.append(f"{field}: the store has {old!r}, this call has {new!r}")
    return "; ".join(problems) or None


def prepare(out: Path, fields: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The manifest to continue from (None for a new store), after cleaning up a crashed run."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} exists and is not a folder; choose another out_dir")
    if not (out / MANIFEST).is_file():
        others = [p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)] if out.exists() else []
        if others:
            raise StoreError(
                f"{out} is not empty ({', '.join(sorted(others)[:3])}…) and holds no {MANIFEST}; "
                "collect into a new or empty folder"
            )
        if out.exists():
            clean_temp_files(out)
        return None
    if not resume:
        raise StoreError(
            f"{out} already holds an ActivationStore; pass resume=True to continue it, or delete the folder "
            "or choose another out_dir to start afresh"
        )
    manifest = read_manifest(out)
    if problem := config_mismatch(manifest, fields):
        raise StoreError(
            f"the store at {out} was collected with other settings — {problem}. Pass the same arguments to "
            "resume it, or collect into another out_dir"
        )
    clean_temp_files(out)
    # a store written before these keys existed gains them when it is next written
    manifest = {"provenance": fields["provenance"], "config": fields["config"], **manifest}
    return _repair(out, manifest)


def _repair(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Drop the first damaged shard and everything after it (they are re-collected), and orphans."""
    shards = [ShardInfo.from_json(s) for s in manifest["shards"]]
    for i, shard in enumerate(shards):
        problem = shard_problem(out.resolve(), shard, manifest)
        if problem is not None:
            warnings.warn(
                f"shard {shard.file} {problem}; re-collecting from prompt {shard.prompts[0]}", stacklevel=4
            )
            manifest = {**manifest, "shards": manifest["shards"][:i], "status": "partial",
                        "tokens": sum(s.tokens for s in shards[:i]), "prompts_consumed": shard.prompts[0]}
            atomic_write_json(out / MANIFEST, manifest)
            break
    listed = {s["file"] for s in manifest["shards"]}
    for path in out.glob(SHARD_PATTERN.replace("{:05d}", "*")):
        if path.name not in listed:  # written just before a crash, never recorded: re-collected
            path.unlink()
    return manifest
