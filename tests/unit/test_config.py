"""The config pattern: CollectConfig round trips, checks, unknown keys, and CLI options derived from the fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from mechkit.activations.config import CollectConfig
from mechkit.cli import app, config_command
from mechkit.config import Config, ConfigError, option

FULL = CollectConfig(sites=["blocks.0.resid_post", "blocks.1.attn.z"], positions=[0, -1], batch_size=4,
                     token_budget=100, ram_budget_mb=1.5, dtype=torch.float16, resume=False, progress=False)


@pytest.mark.parametrize("config", [FULL, CollectConfig(sites="embed")], ids=["every field set", "defaults"])
def test_round_trips_through_yaml_json_and_dicts(config):
    assert CollectConfig.from_yaml(config.to_yaml()) == config
    assert CollectConfig.from_json(config.to_json()) == config
    assert CollectConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert yaml.safe_load(config.to_yaml()) == config.to_dict()


def test_values_are_json_ready_and_normalised():
    assert FULL.to_dict() == {
        "sites": ["blocks.0.resid_post", "blocks.1.attn.z"], "positions": [0, -1], "batch_size": 4,
        "token_budget": 100, "ram_budget_mb": 1.5, "dtype": "float16", "resume": False, "progress": False,
    }
    assert FULL.sites == ("blocks.0.resid_post", "blocks.1.attn.z") and FULL.positions == (0, -1)
    assert FULL.torch_dtype is torch.float16
    from mechkit.sites import Site

    config = CollectConfig(sites=Site.parse("blocks.0.resid_post"), ram_budget_mb=2)
    assert config.sites == ("blocks.0.resid_post",) and config.ram_budget_mb == 2.0 and config.positions == "all"
    hash(config)  # frozen and hashable: usable as a cache key


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.batch_size = 3  # type: ignore[misc]
    assert FULL.replace(batch_size=3).batch_size == 3 and FULL.batch_size == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"dtype": "float8"}, "dtype must be one of 'float16', 'bfloat16', 'float32' or 'float64', got 'float8'"),
        ({"dtype": torch.int8}, "dtype must be one of"),
        ({"positions": "first"}, "positions must be 'all', 'last' or a list of integers, got 'first'"),
        ({"positions": [1, "x"]}, "positions must be"),
        ({"positions": []}, "non-empty list"),
        ({"token_budget": 0}, "token_budget must be a positive integer or None"),
        ({"ram_budget_mb": 0}, "ram_budget_mb must be a positive number"),
        ({"ram_budget_mb": float("inf")}, "ram_budget_mb must be a positive number"),
        ({"sites": []}, "sites is empty"),
        ({"sites": [3]}, "sites must be a list of strings"),
        ({"resume": "yes"}, "resume must be true or false"),
    ],
)
def test_post_init_rejects_bad_values(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CollectConfig(**{"sites": ["embed"], **change})


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"no option 'batchsize'; did you mean 'batch_size'\? valid options: sites, "):
        CollectConfig.from_dict({"sites": ["embed"], "batchsize": 4})
    with pytest.raises(ConfigError, match="did you mean 'ram_budget_mb'"):
        FULL.replace(ram_budget=3)
    with pytest.raises(ConfigError, match="no option 'colour'; valid options"):
        CollectConfig.from_yaml("sites: [embed]\ncolour: red\n")
    with pytest.raises(ConfigError, match="needs 'sites': site names or globs"):
        CollectConfig.from_dict({"batch_size": 4})
    with pytest.raises(ConfigError, match="mapping of option names"):
        CollectConfig.from_yaml("- embed\n")


def test_yaml_is_read_safely():
    with pytest.raises(ConfigError, match="not valid YAML"):
        CollectConfig.from_yaml("sites: !!python/object/apply:os.system ['true']\n")


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text(FULL.to_yaml())
    (tmp_path / "c.json").write_text(FULL.to_json())
    assert CollectConfig.from_file(tmp_path / "c.yaml") == CollectConfig.from_file(tmp_path / "c.json") == FULL
    with pytest.raises(ConfigError, match="is a folder"):
        CollectConfig.from_file(tmp_path)
    (tmp_path / "c.txt").write_text(FULL.to_yaml())
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml or \.json"):
        CollectConfig.from_file(tmp_path / "c.txt")


def test_command_line_text_parses_by_field_type():
    assert CollectConfig.parse_text("positions", "0,-1") == [0, -1]
    assert CollectConfig.parse_text("positions", "last") == "last"
    assert CollectConfig.parse_text("sites", "a, b") == ["a", "b"]
    assert CollectConfig.parse_text("token_budget", "none") is None
    assert CollectConfig.parse_text("ram_budget_mb", "0.5") == 0.5
    with pytest.raises(ConfigError, match="positions must be 'all', 'last' or comma-separated integers, got '1,x'"):
        CollectConfig.parse_text("positions", "1,x")


def test_every_field_needs_help_text():
    with pytest.raises(TypeError, match=r"Bad.n has no help text"):
        @dataclass(frozen=True, kw_only=True)
        class Bad(Config):
            n: int = 3


def test_field_help_is_in_the_class_docstring():
    for name in CollectConfig.fields():
        assert f"{name} (" in CollectConfig.__doc__ and CollectConfig.field_help(name) in CollectConfig.__doc__


@dataclass(frozen=True, kw_only=True)
class Inner(Config):
    """A nested config."""

    width: int = option(4, help="a width")


@dataclass(frozen=True, kw_only=True)
class Outer(Config):
    """A config holding another one."""

    inner: Inner = option(Inner(), help="the nested part")
    weights: dict[str, float] | None = option(None, help="named weights")
    label: str | None = option(None, help="a label")


def test_nested_configs_and_mappings_round_trip():
    outer = Outer(inner={"width": 7}, weights={"a": 1})
    assert outer.inner == Inner(width=7) and outer.weights == {"a": 1.0}
    assert outer.to_dict() == {"inner": {"width": 7}, "weights": {"a": 1.0}, "label": None}
    assert Outer.from_yaml(outer.to_yaml()) == outer
    with pytest.raises(ConfigError, match="Inner has no option 'wdth'; did you mean 'width'"):
        Outer(inner={"wdth": 7})


# -- command-line options derived from the config ------------------------------------------------
def options_of(command) -> set[str]:
    return {p.name for p in command.params if p.param_type_name == "option"} - {"help"}


def test_cache_options_are_the_collect_config_fields():
    cache = typer.main.get_command(app).commands["cache"]  # type: ignore[attr-defined]
    own = {"prompts", "out", "backend", "config_file"}
    assert options_of(cache) - own == set(CollectConfig.fields())
    for param in cache.params:
        if param.name in CollectConfig.fields():
            assert CollectConfig.field_help(param.name) in param.help
            assert param.opts[0] == "--" + param.name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class Extended(CollectConfig):
    """CollectConfig plus one field."""

    seed: int = option(0, help="a seed")


def test_a_new_field_becomes_a_new_option_with_its_type_checked():
    toy = typer.Typer()
    seen = []

    @config_command(toy, Extended)
    def run(config: Extended, name: str = typer.Argument(...)) -> None:
        seen.append((name, config))

    @toy.command()
    def other() -> None:  # a second command, so that the typer app keeps subcommand names
        pass

    assert options_of(typer.main.get_command(toy).commands["run"]) == {*Extended.fields(), "config_file"}
    result = CliRunner().invoke(toy, ["run", "x", "--sites", "embed", "--seed", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen == [("x", Extended(sites=["embed"], seed=5, progress=False))]
    result = CliRunner().invoke(toy, ["run", "x", "--sites", "embed", "--seed", "five"])
    assert result.exit_code == 2 and "error: Extended.seed must be an integer, got 'five'" in result.output


def test_a_config_file_fills_options_and_flags_override_it(tmp_path):
    toy, seen = typer.Typer(), []

    @config_command(toy, CollectConfig)
    def run(config: CollectConfig) -> None:
        seen.append(config)

    @toy.command()
    def other() -> None:
        pass

    file = tmp_path / "cfg.yaml"
    file.write_text("sites: [embed, blocks.0.resid_post]\nbatch_size: 2\npositions: [0, -1]\nprogress: false\n")
    result = CliRunner().invoke(toy, ["run", "--config", str(file), "--batch-size", "3", "--positions", "last"])
    assert result.exit_code == 0, result.output
    assert seen == [CollectConfig(sites=["embed", "blocks.0.resid_post"], batch_size=3, positions="last",
                                  progress=False)]
    file.write_text("sites: [embed]\nbatchsize: 2\n")
    result = CliRunner().invoke(toy, ["run", "--config", str(file)])
    assert result.exit_code == 2 and "did you mean 'batch_size'" in result.output
    result = CliRunner().invoke(toy, ["run"])
    assert result.exit_code == 2 and "error: missing option --sites" in result.output
