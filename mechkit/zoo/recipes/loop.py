"""The resumable, bit-reproducible training driver shared by every zoo recipe.

A recipe builds its model and optimiser under a fixed seed and hands them to a :class:`Trainer`::

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model, opt = ...
        trainer = Trainer(out, spec, model, opt, outputs=("card.json", "model.safetensors"))
        start = trainer.resume_or_start()       # 0 for a fresh run, else the last saved step
        for step in range(start + 1, spec.steps + 1):
            ...                                  # one optimiser step; data = f(spec, step) only
            trainer.records.append({...})        # optional evaluation records
            if step % spec.state_every == 0 or step == spec.steps:
                trainer.save_checkpoint(step)
        ...                                      # write the outputs
        trainer.finish()

A resumed run equals an uninterrupted one bit for bit because the saved state holds the model, the
optimiser (moments and step counts) and torch's global RNG of one step, the data of every step is a
pure function of (spec, step), and a run only resumes under the settings it was started with.
Every file is written atomically (:mod:`mechkit.atomic`), so a run killed at any moment leaves the
last complete state behind plus temp files that the next start removes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mechkit import atomic

STATE_DIR = ".train_state"
"""Sub-folder of the output folder that holds the state of an unfinished run."""


class Spec(Protocol):
    """What the driver needs from a recipe's settings: a JSON-able description of the run."""

    def to_dict(self) -> dict: ...


class Trainer:
    """A resumable training run of ``model`` with ``opt`` into the folder ``out``.

    ``outputs`` names the files and folders a finished run leaves in ``out``; a fresh start removes
    them (and nothing else), so an old card never sits beside new weights. ``records`` (evaluation
    rows, JSON types only) and the wall time are saved with the state and survive a resume.
    """

    def __init__(self, out: str | Path, spec: Spec, model: torch.nn.Module, opt: torch.optim.Optimizer, *,
                 outputs: Sequence[str]) -> None:
        self.out = Path(out)
        self.state_dir = self.out / STATE_DIR
        self.spec, self.model, self.opt = spec, model, opt
        self.outputs = tuple(outputs)
        self.records: list[dict] = []
        self.sessions = 1
        self._elapsed_before = 0.0
        self._t0 = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        """Training wall time over all sessions of this run."""
        return self._elapsed_before + time.perf_counter() - self._t0

    def resume_or_start(self) -> int:
        """Load the state of an interrupted run with the same settings, or prepare a fresh start.
        Returns the last completed step (0 when starting fresh). Call it under the seeded RNG the
        model was built with: resuming restores torch's global RNG state."""
        meta = load_state(self.state_dir, self.spec, self.model, self.opt)
        remove_partial_writes(self.out)
        if meta is None:
            for name in self.outputs:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            return 0
        step = meta["step"]
        self.records = [r for r in meta["records"] if r["step"] <= step]
        self.sessions = meta["sessions"] + 1
        self._elapsed_before = meta["elapsed_s"]
        self._t0 = time.perf_counter()
        return step

    def save_checkpoint(self, step: int) -> None:
        """Save model, optimiser, RNG, records and wall time after ``step`` (atomically)."""
        info = {"records": self.records, "elapsed_s": self.elapsed_s, "sessions": self.sessions}
        save_state(self.state_dir, self.spec, self.model, self.opt, step, info)

    def finish(self) -> None:
        """Delete the saved state once the outputs are in place: the run is complete."""
        shutil.rmtree(self.state_dir, ignore_errors=True)


def save_state(state_dir: Path, spec: Spec, model, opt, step: int, info: dict[str, Any]) -> None:
    """One safetensors file (model, optimiser tensors, RNG) and ``state.json`` naming it. The JSON
    is replaced last, so a crash in between leaves the previous complete state in charge."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng/torch"] = torch.get_rng_state()
    fname = f"state-{step:06d}.safetensors"
    atomic.atomic_save_safetensors(tensors, state_dir / fname)
    groups = [dict(g) for g in opt.state_dict()["param_groups"]]
    meta = {"step": step, "file": fname, "spec": spec.to_dict(), "param_groups": groups, **info}
    atomic.atomic_write_json(state_dir / "state.json", meta)
    for old in state_dir.glob("state-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_state(state_dir: Path, spec: Spec, model, opt) -> dict | None:
    """Restore a saved state into ``model`` and ``opt`` (and torch's RNG); None if there is none."""
    meta_path = state_dir / "state.json"
    if not meta_path.is_file():
        return None
    from safetensors.torch import load_file

    meta = json.loads(meta_path.read_text())
    if meta["spec"] != json.loads(json.dumps(spec.to_dict())):
        raise ValueError(
            f"{state_dir} holds an interrupted run with different settings; finish it with the same "
            f"arguments or delete that folder to start over"
        )
    tensors = load_file(state_dir / meta["file"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, name = k.split("/", 2)
            opt_state.setdefault(int(i), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    return meta


def remove_partial_writes(out: Path) -> list[str]:
    """Remove the temp files and folders (prefix :data:`mechkit.atomic.TMP_PREFIX`) that a run killed
    in the middle of a write left in ``out``, its ``checkpoints/`` and its state folder."""
    removed = []
    for folder in (out, out / "checkpoints", out / STATE_DIR):
        if not folder.is_dir():
            continue
        removed += atomic.clean_temp_files(folder)
        for d in folder.glob(atomic.TMP_PREFIX + "*"):
            if d.is_dir():
                shutil.rmtree(d)
                removed.append(d.name)
    return removed
