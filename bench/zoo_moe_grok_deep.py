"""Retrain ``moe-grok-deep`` from scratch and compare its weights, bit for bit, with the shipped ones.

A child process runs ``mechkit.zoo.recipes.moe_grok_deep.train`` on one thread into ``--out``
(default: a temporary folder). With ``--kills N`` the child is killed with SIGKILL N times, each
time once its saved training state has advanced past the previous kill, and restarted: the run
resumes from its last saved state. At the end the sha256 of the final ``model.safetensors`` and of
every shipped checkpoint's weights are compared with the zoo folder; the script prints the wall
time (measured here, all sessions) and the card's training time, and exits 1 on any difference.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zoo_moe_grok_deep.py --series main --kills 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = """
import sys, torch
torch.set_num_threads(1)
from mechkit.zoo.recipes import moe_grok_deep
moe_grok_deep.train(sys.argv[1], series=sys.argv[2], progress=False)
"""


def digests(folder: Path) -> dict[str, str]:
    files = [folder / "model.safetensors", *sorted((folder / "checkpoints").rglob("model.safetensors"))]
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def saved_step(folder: Path) -> int:
    state = folder / ".train_state" / "state.json"
    try:
        return json.loads(state.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def run(out: Path, series: str, kills: int) -> tuple[float, int]:
    """Train into ``out``, killing the child ``kills`` times; returns (wall time s, kills done)."""
    from mechkit.zoo.recipes.moe_grok_deep import CONTROL_DIR

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watched = out / CONTROL_DIR if series == "control" else out
    t0, done, last = time.perf_counter(), 0, 0
    while True:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), series], env=env)
        while done < kills and proc.poll() is None:
            if saved_step(watched) > last:  # a new state past the previous kill: interrupt here
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done += 1
                last = saved_step(watched)
                print(f"killed after saved step {last}", flush=True)
                break
            time.sleep(0.5)
        if proc.poll() is None or proc.returncode == 0:
            if proc.wait() != 0:
                raise SystemExit(f"training failed with exit code {proc.returncode}")
            return time.perf_counter() - t0, done
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"training failed with exit code {proc.returncode}")


def compare(name: str, got: Path, shipped: Path) -> bool:
    a, b = digests(got), digests(shipped)
    same = a == b and len(a) > 1
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    card = json.loads((got / "card.json").read_text())
    print(f"{name}: {len(a)} weight files, {'bit for bit identical' if same else 'DIFFERENT: ' + ', '.join(diff)}; "
          f"card: train {card['metrics']['train_acc']:.4f}, test {card['metrics']['test_acc']:.4f}, "
          f"steps 99%/95%: {card['metrics']['step_train_99']}/{card['metrics']['step_test_95']}, "
          f"training time {card['wall_time_s']:.0f} s over {card['sessions']} sessions")
    return same


def main() -> None:
    from mechkit.zoo import registry
    from mechkit.zoo.recipes.moe_grok_deep import CONTROL_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="training folder (default: a temporary one)")
    ap.add_argument("--series", choices=("main", "control", "both"), default="main")
    ap.add_argument("--kills", type=int, default=0, help="SIGKILL the training this many times")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="moe-grok-deep-"))
    wall, kills = run(out, args.series, args.kills)
    print(f"series {args.series}: wall time {wall:.0f} s ({kills} SIGKILLs and resumes), into {out}")
    shipped = registry.resolve("moe-grok-deep")
    ok = True
    for s in ("main", "control"):
        if args.series in (s, "both"):
            sub = CONTROL_DIR if s == "control" else "."
            ok &= compare(s, out / sub, shipped / sub)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
