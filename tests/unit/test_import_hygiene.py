"""Importing mechkit changes nothing global, and plotting code stays unloaded until a plot is drawn."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys, warnings, torch
state = lambda: (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
                 logging.getLogger().level, len(logging.getLogger().handlers), len(warnings.filters),
                 torch.are_deterministic_algorithms_enabled())
before = state()
import mechkit
mechkit.load, mechkit.Site, mechkit.ActivationCache, mechkit.interventions.Zero
after = state()
assert before == after, (before, after)
heavy = [m for m in ("transformer_lens", "nnsight", "sae_lens", "matplotlib") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""

# Results and viz are imported by every analysis: defining, building, saving and loading a result
# must not load matplotlib; the first plot does (and still leaves pyplot untouched).
RESULTS_SCRIPT = """
import sys, tempfile
from dataclasses import dataclass
import torch
import mechkit.results, mechkit.viz
from mechkit.results import Result

@dataclass(frozen=True, eq=False)
class Scores(Result):
    scores: torch.Tensor

    def _plot(self, fig):
        mechkit.viz.label(fig.add_subplot(), x="layer")

folder = Scores(torch.ones(3), config={"k": 1}).save(tempfile.mkdtemp())
Result.load(folder)
assert "matplotlib" not in sys.modules, "matplotlib loaded before any plot"
Scores(torch.ones(3)).plot()
assert "matplotlib" in sys.modules and "matplotlib.pyplot" not in sys.modules
print("ok")
"""


def _run(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_import_has_no_side_effects():
    _run(SCRIPT)


def test_results_and_viz_load_matplotlib_only_to_plot():
    _run(RESULTS_SCRIPT)
