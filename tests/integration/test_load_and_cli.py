"""Loading from local folders (the same path a hub id takes) and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mechkit
from mechkit.activations.config import CollectConfig
from mechkit.cli import app
from mechkit.errors import MechkitError
from tests.conftest import tiny_hf_model, tiny_ids

WORDS = "abcdefghijklmnopqrstuvwxyz"
ROWS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = tiny_hf_model("llama")
    hf.save_pretrained(path)
    return path, hf


def test_load_local_folder_matches_the_in_memory_model(folder):
    path, hf = folder
    model = mechkit.load(str(path))
    ids = tiny_ids()
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert model.info.architecture == "llama" and model.info.n_layers == 2
    _, cache = model.run_with_cache(ids, "blocks.0.attn.pattern")  # eager attention by default
    assert cache["blocks.0.attn.pattern"].shape == (3, 4, 7, 7)


def test_cli_help_and_sites(folder):
    path, _ = folder
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "sites" in result.output and "cache" in result.output
    result = runner.invoke(app, ["sites", str(path), "--pattern", "blocks.1.attn.*"])
    assert result.exit_code == 0, result.output
    lines = [line.split()[0] for line in result.output.splitlines() if line.startswith("  blocks.")]
    expected = [str(s) for s in mechkit.load(str(path)).resolve("blocks.1.attn.*")]  # the CLI lists what resolves
    assert lines == expected and {"blocks.1.attn.q", "blocks.1.attn.z", "blocks.1.attn.pattern"} <= set(lines)


def test_cli_reports_errors_without_a_traceback(folder):
    path, _ = folder
    result = CliRunner().invoke(app, ["sites", str(path), "--pattern", "blocks.*.resid_middle"])
    assert result.exit_code == 2
    assert "matches no site" in result.output and "Traceback" not in result.output


def write_prompts(path, rows=ROWS):
    path.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i] for i in r)}) + "\n" for r in rows))
    return path


def add_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(WORDS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="a", pad_token="a").save_pretrained(path)


def test_cli_cache_fills_a_store_that_matches_run_with_cache(tmp_path):
    from mechkit.activations.store import ActivationStore

    path = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(path)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    # a folder without a tokenizer: the CLI must say so clearly
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["cache", str(path), "--sites", "blocks.*.resid_post", "--prompts",
                                      str(prompts), "--out", str(out)])
    assert result.exit_code == 2 and "tokenizer" in result.output

    add_tokenizer(path)
    result = CliRunner().invoke(app, ["cache", str(path), "--sites", "blocks.*.resid_post", "--prompts",
                                      str(prompts), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    store = ActivationStore(out)
    assert store.token_ids.load().tolist() == [t for r in ROWS for t in r]
    model = mechkit.load(str(path))
    _, cache = model.run_with_cache(torch.tensor([ROWS[0]]), "blocks.1.resid_post")
    torch.testing.assert_close(store["blocks.1.resid_post"][0:4], cache["blocks.1.resid_post"][0], atol=1e-5, rtol=0)
    assert store.config == CollectConfig(sites=["blocks.*.resid_post"], batch_size=2)


def test_cli_cache_reads_a_config_file_and_flags_override_it(folder, tmp_path):
    path, _ = folder
    add_tokenizer(path)
    config = tmp_path / "collect.yaml"
    config.write_text(CollectConfig(sites=["blocks.0.resid_post"], positions=[0], batch_size=1, dtype="float16",
                                    progress=False).to_yaml())
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["cache", str(path), "--prompts", str(write_prompts(tmp_path / "p.jsonl")),
                                      "--out", str(out), "--config", str(config), "--positions", "-1"])
    assert result.exit_code == 0, result.output
    store = mechkit.ActivationStore(out)
    assert store.config == CollectConfig(sites=["blocks.0.resid_post"], positions=[-1], batch_size=1,
                                         dtype="float16", progress=False)
    assert store.token_ids.load().tolist() == [r[-1] for r in ROWS] and store.dtype == torch.float16


def test_cli_cache_help_lists_every_config_field():
    result = CliRunner().invoke(app, ["cache", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in CollectConfig.fields():
        assert "--" + name.replace("_", "-") in result.output


def bad_jsonl(tmp_path, text):
    (tmp_path / "bad.jsonl").write_text(text)
    return ["--prompts", str(tmp_path / "bad.jsonl")]


BAD_CLI = [
    ("float8", lambda t: ["--dtype", "float8"], "dtype must be one of 'float16', 'bfloat16', 'float32' or 'float64'"),
    ("positions 1,x", lambda t: ["--positions", "1,x"], "positions must be 'all', 'last' or comma-separated integers"),
    ("batch size text", lambda t: ["--batch-size", "many"], "batch_size must be an integer, got 'many'"),
    ("negative batch size", lambda t: ["--batch-size", "-2"], "batch_size must be a positive integer"),
    ("no prompt field", lambda t: bad_jsonl(t, '{"prompt": "a b"}\n\n{"text": "c"}\n'),
     "bad.jsonl line 3 has no 'prompt' string (found keys ['text'])"),
    ("invalid json line", lambda t: bad_jsonl(t, '{"prompt": "a b"}\n{"prompt": \n'),
     "bad.jsonl line 2 is not valid JSON"),
    ("prompts is a folder", lambda t: ["--prompts", str(t)], "is a folder; pass a text file"),
    ("no prompt file", lambda t: ["--prompts", str(t / "missing.txt")], "no prompt file at"),
    ("config file missing", lambda t: ["--config", str(t / "c.yaml")], "config file"),
    ("unknown config key", lambda t: ["--config", str(t / "k.yaml")], "did you mean 'batch_size'"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD_CLI, ids=[c[0] for c in BAD_CLI])
def test_cli_cache_bad_input_is_an_error_line_not_a_traceback(folder, tmp_path, case, args, message):
    path, _ = folder
    (tmp_path / "p.txt").write_text("a b\n")
    (tmp_path / "k.yaml").write_text("batchsize: 3\n")
    base = ["cache", str(path), "--sites", "blocks.0.resid_post", "--prompts", str(tmp_path / "p.txt"),
            "--out", str(tmp_path / "store")]
    result = CliRunner().invoke(app, base + args(tmp_path))
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "store").exists()


def test_load_a_folder_without_a_usable_config(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechkitError, match=r"has no config\.json, so it is not a Hugging Face model folder"):
        mechkit.load(str(tmp_path / "empty"))
    for name, text in [("no-type", '{"hidden_size": 4}'), ("not-json", "{oops"), ("unknown", '{"model_type": "zzz"}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        with pytest.raises(MechkitError, match=r"(?s)config.json is not a usable transformers config .*'model_type'"):
            mechkit.load(str(tmp_path / name))
    result = CliRunner().invoke(app, ["sites", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "error: " in result.output and "Traceback" not in result.output
