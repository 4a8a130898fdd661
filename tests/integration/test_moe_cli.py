"""``mechkit pathways`` end to end on three moe-grok checkpoints and a slice of its samples."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mechkit.cli import app
from mechkit.moe import PathwayMonitorResult, checkpoint_folders, split_samples
from mechkit.zoo.registry import resolve


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def test_pathways_command_writes_result_table_and_figure(tmp_path):
    root = resolve("moe-grok")
    folders, steps = checkpoint_folders(root)
    train, test = split_samples(root)
    train_file, test_file = _jsonl(tmp_path / "train.jsonl", train[:80]), _jsonl(tmp_path / "test.jsonl", test[:80])
    picked = [str(folders[i]) for i in (6, 12, 19)]
    out = tmp_path / "out"
    args = ["pathways", *picked, "--train", str(train_file), "--test", str(test_file), "--out", str(out),
            "--min-group", "5", "--taus", "0.5,0.7", "--no-progress"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    result = PathwayMonitorResult.load(out)
    assert result.steps == [steps[i] for i in (6, 12, 19)] and result.taus == [0.5, 0.7]
    assert result.config["min_group"] == 5
    assert (out / "figure.png").stat().st_size > 0
    assert "distance (tau 0.7)" in (out / "correlations.csv").read_text()
    assert len((out / "table.csv").read_text().splitlines()) == 1 + 2 * 3


def test_pathways_command_reports_bad_input(tmp_path):
    folders, _ = checkpoint_folders(resolve("moe-grok"))
    empty = _jsonl(tmp_path / "e.jsonl", [("3 + 5 =", "")])
    run = CliRunner().invoke(app, ["pathways", str(folders[0]), str(folders[1]), "--train", str(empty), "--test",
                                   str(empty), "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and "empty answer" in run.output
    run = CliRunner().invoke(app, ["pathways", str(folders[0]), str(folders[1]), "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and "one zoo model folder" in run.output
    run = CliRunner().invoke(app, ["pathways", str(folders[0]), "--taus", "1.5", "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and "(0, 1]" in run.output
