"""`mechkit sae train` and `mechkit sae eval` on facts-lm: a folder sae-lens can load, an evaluation
that equals the Python API's, and clear errors for missing pieces."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mechkit
from mechkit import tasks
from mechkit.cli import app
from mechkit.sae import evaluate_sae, load_sae

SITE = "blocks.2.resid_post"


def test_train_then_eval(tmp_path):
    sentences = tasks.corpus(split="train", seed=0)
    prompts = tmp_path / "train.txt"
    prompts.write_text("\n".join(" ".join(sentences[i:i + 4]) for i in range(0, 400, 4)) + "\n")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(" ".join(sentences[i:i + 4]) for i in range(400, 480, 4)) + "\n")
    runner = CliRunner()
    trained = runner.invoke(app, ["sae", "train", "zoo:facts-lm", "--prompts", str(prompts), "--site", SITE,
                                  "--out-dir", str(tmp_path / "run"), "--d-sae", "128", "--k", "8",
                                  "--tokens", "16384", "--batch-size", "512", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    loaded = load_sae(tmp_path / "run" / "sae")
    assert loaded.provenance.site == SITE and loaded.provenance.train_config.k == 8
    evaluated = runner.invoke(app, ["sae", "eval", "zoo:facts-lm", str(tmp_path / "run" / "sae"),
                                    "--prompts", str(held_out), "--out", str(tmp_path / "eval"), "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    for name in ("result.json", "eval.csv", "frequencies.png"):
        assert (tmp_path / "eval" / name).is_file()
    saved = json.loads((tmp_path / "eval" / "result.json").read_text())["fields"]
    direct = evaluate_sae(mechkit.load("zoo:facts-lm"), loaded.sae, SITE, held_out.read_text().splitlines(),
                          progress=False)
    assert saved["fvu"] == pytest.approx(direct.fvu, rel=1e-9)
    inspected = runner.invoke(app, ["sae", "inspect", "zoo:facts-lm", str(tmp_path / "run" / "sae"), "--prompts",
                                    str(held_out), "--out", str(tmp_path / "inspect"), "--latents", "0,5", "--k", "3"])
    assert inspected.exit_code == 0, inspected.output
    page = (tmp_path / "inspect" / "top_contexts.html").read_text()
    assert "latent 0" in page and "latent 5" in page
    assert (tmp_path / "inspect" / "frequencies.png").is_file()


def test_clear_errors(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A twib is built from metal.\n")
    runner = CliRunner()
    no_out = runner.invoke(app, ["sae", "train", "zoo:facts-lm", "--prompts", str(prompts), "--site", SITE])
    assert no_out.exit_code == 2 and "--out-dir" in no_out.output
    missing = runner.invoke(app, ["sae", "eval", "zoo:facts-lm", str(tmp_path / "nothing"), "--prompts", str(prompts),
                                  "--out", str(tmp_path / "e")])
    assert missing.exit_code == 2 and "nothing" in missing.output
