"""`mechkit run`: a declarative experiment writes a complete run folder; a run killed between steps
resumes (finished steps are skipped) and ends with the same results as an uninterrupted run;
bad experiments fail before any model loads."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mechkit.cli import app
from mechkit.config import ConfigError
from mechkit.report import Experiment, experiment, run_experiment

EXPERIMENT = {
    "name": "truth-depth",
    "model": "zoo:facts-lm",
    "seeds": [0],
    "data": {"dataset": "probes/truth_medium.jsonl"},
    "steps": [
        {"name": "logistic", "method": "probe_sweep", "config": {"sites": "blocks.*.resid_post", "split": 0.6}},
        {"name": "mean-diff", "method": "probe_sweep",
         "config": {"sites": "blocks.*.resid_post", "probe": "mean_diff", "split": 0.6}},
    ],
}


def _write(tmp_path, data=EXPERIMENT):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _results(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.name in ("result.json", "tensors.safetensors", "table.csv")}


def test_run_folder_and_resume_after_a_kill(tmp_path, monkeypatch):
    path = _write(tmp_path)
    whole = tmp_path / "whole"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(whole), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("experiment.yaml", "manifest.json", "summary.md", "summary.html",
                 "steps/logistic/seed-0/figure.png", "steps/mean-diff/seed-0/table.csv"):
        assert (whole / name).is_file(), name
    manifest = json.loads((whole / "manifest.json").read_text())
    assert set(manifest["steps"]) == {"logistic/seed-0", "mean-diff/seed-0"}
    assert manifest["model"]["fingerprint"] and manifest["versions"]["torch"]

    # kill the run as the second step starts, then resume it
    calls = []
    original = experiment._call

    def dying(step, *args, **kwargs):
        calls.append(step.name)
        if step.name == "mean-diff" and calls.count("mean-diff") == 1:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)

    monkeypatch.setattr(experiment, "_call", dying)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(path, killed, progress=False)
    run_experiment(path, killed, progress=False)
    assert calls == ["logistic", "mean-diff", "mean-diff"]  # the finished step was not run again
    assert _results(killed) == _results(whole)


def test_bad_experiments_fail_before_loading(tmp_path):
    bad_method = {**EXPERIMENT, "steps": [{"method": "magic"}]}
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        Experiment.from_mapping(bad_method)
    bad_option = {**EXPERIMENT, "steps": [{"method": "probe_sweep", "config": {"sitez": "x"}}]}
    with pytest.raises(ConfigError, match="sitez"):
        Experiment.from_mapping(bad_option)
    with pytest.raises(ConfigError, match="unknown keys"):
        Experiment.from_mapping({**EXPERIMENT, "modle": "x"})
    result = CliRunner().invoke(app, ["run", str(_write(tmp_path, bad_method))])
    assert result.exit_code == 2 and "unknown method" in result.output


def test_a_changed_experiment_is_not_mixed_into_an_old_run(tmp_path):
    path = _write(tmp_path, {**EXPERIMENT, "steps": EXPERIMENT["steps"][:1]})
    run_experiment(path, tmp_path / "run", progress=False)
    changed = _write(tmp_path, {**EXPERIMENT, "steps": EXPERIMENT["steps"][1:]})
    with pytest.raises(Exception, match="different experiment"):
        run_experiment(changed, tmp_path / "run", progress=False)


def test_shipped_experiments_parse_and_one_runs(tmp_path):
    from pathlib import Path

    folder = Path(__file__).parents[2] / "experiments"
    experiments = [Experiment.from_file(p) for p in sorted(folder.glob("*.yaml"))]
    assert {e.name for e in experiments} >= {"ioi-facts-lm", "colored-objects-facts-lm"}
    manifest = run_experiment(folder / "colored_objects_facts_lm.yaml", tmp_path / "run", progress=False)
    assert set(manifest["steps"]) == {"residual/seed-0", "layer-outputs/seed-0"}
    assert (tmp_path / "run" / "steps" / "residual" / "seed-0" / "figure.png").is_file()
