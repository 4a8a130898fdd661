"""`mechkit patch`: one sweep from the command line equals the Python call and writes its files."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import mechkit
from mechkit import tasks
from mechkit.cli import app
from mechkit.patching import PatchingResult, activation_patching, make_pairs


def test_patch_command(tmp_path):
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["patch", "zoo:facts-lm", "--task", "ioi", "--n", "6", "--out", str(out),
                                      "--sites", "blocks.*.resid_pre", "--positions", "last"])
    assert result.exit_code == 0, result.output
    assert (out / "figure.png").is_file() and (out / "table.csv").is_file()
    model = mechkit.load("zoo:facts-lm")
    direct = activation_patching(model, make_pairs(model, tasks.generate("ioi", 6, 0)), sites="blocks.*.resid_pre",
                                 positions="last")
    assert torch.allclose(PatchingResult.load(out).scores, direct.scores, atol=1e-6)
    both = CliRunner().invoke(app, ["patch", "zoo:facts-lm", "--out", str(out)])
    assert both.exit_code == 2 and "exactly one" in both.output
