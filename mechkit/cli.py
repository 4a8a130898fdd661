"""The ``mechkit`` command."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from mechkit.activations.config import CollectConfig
from mechkit.config import Config, ConfigError, metavar, read_mapping
from mechkit.moe.config import PathwayConfig
from mechkit.patching.config import PatchConfig
from mechkit.probing.config import SweepConfig
from mechkit.sae.config import TrainConfig
from mechkit.sae.evaluate import EvalConfig

app = typer.Typer(help="mechkit: mechanistic interpretability with one site vocabulary.", no_args_is_help=True)
zoo_app = typer.Typer(help="The model zoo: list, inspect, retrain and re-evaluate bundled models.")
app.add_typer(zoo_app, name="zoo")
sae_app = typer.Typer(help="Sparse autoencoders: train through sae-lens, evaluate in the model, inspect latents.")
app.add_typer(sae_app, name="sae")

BACKEND = typer.Option("torch_hooks", help="torch_hooks | lens | nnsight")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def config_command(typer_app: typer.Typer, config_cls: type[Config], **command_kwargs: Any) -> Callable:
    """Register ``fn(config, ...)`` as a command whose options are the fields of ``config_cls``.

    Each field becomes ``--field-name`` with the field's help, default and accepted values (a bool
    field becomes ``--name/--no-name``); ``--config FILE`` reads the same keys from YAML or JSON, and
    flags given on the command line override the file. Values are parsed and checked by the config
    class itself, and a bad one exits with ``error: ...`` and code 2. ``fn``'s other parameters stay
    the command's own arguments and options; ``fn`` receives the built config as ``config``.
    """

    def register(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
               for p in inspect.signature(fn).parameters.values() if p.name != "config"]
        clash = {p.name for p in own} & {*config_cls.fields(), "config_file"}
        if clash:
            raise TypeError(f"{fn.__name__} has parameters {sorted(clash)} that {config_cls.__name__} already defines")
        config_file = inspect.Parameter(
            "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
            default=typer.Option(None, "--config", help=f"YAML or JSON file of {config_cls.__name__} options "
                                 "(the option names below, with underscores); flags given here override it"),
        )

        def command(**values: Any) -> Any:
            given = {name: values.pop(name) for name in config_cls.fields()}
            config = _config_from_cli(config_cls, values.pop("config_file"), given)
            return fn(config=config, **values)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        params = [*own, config_file, *(_field_option(config_cls, name) for name in config_cls.fields())]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        typer_app.command(**command_kwargs)(command)
        return fn

    return register


def _field_option(config_cls: type[Config], name: str) -> inspect.Parameter:
    """The typer option of one config field. Options default to None ("not given") so that a
    --config file can fill them; the field's own default is what --help shows."""
    field, tp = config_cls.fields()[name], config_cls.field_type(name)
    flag = "--" + name.replace("_", "-")
    if name in config_cls.required():
        text = field.metadata["help"] + " (required, here or in --config)"
    elif field.default is None or field.default is dataclasses.MISSING:  # none, or built by a factory
        text = field.metadata["help"]
    else:
        shown = (flag if field.default else f"--no-{flag[2:]}") if tp is bool else _cli_text(field.default)
        text = f"{field.metadata['help']} (default: {shown})"
    if tp is bool:
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=text, show_default=False)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool | None)
    option = typer.Option(None, flag, help=text, metavar=metavar(tp), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str | None)


def _cli_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _config_from_cli(config_cls: type[Config], file: Path | None, given: dict[str, Any]) -> Any:
    """The config from ``file`` (if any) with the options given on the command line on top."""
    try:
        values = read_mapping(file) if file is not None else {}
        for name, raw in given.items():
            if raw is not None:
                values[name] = raw if isinstance(raw, bool) else config_cls.parse_text(name, raw)
        missing = [n for n in config_cls.required() if n not in values]
        if missing:
            raise ConfigError(f"missing option --{missing[0].replace('_', '-')} ({config_cls.field_help(missing[0])}); "
                              "give it on the command line or in the --config file")
        return config_cls.from_dict(values)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def demo(
    out: Path = typer.Option(Path("mechkit-demo"), help="folder for the figures"),
    model: str | None = typer.Option(None, help="model to use (default: zoo:smollm2-135m, else zoo:facts-lm)"),
) -> None:
    """A short tour: load a real model offline, capture activations, decode layers, plot."""
    from mechkit.demo import demo_model, run_demo

    typer.echo("loading the demo model (the first run converts SmolLM2-135M once, about a minute)…")
    wrapped = demo_model(model)
    typer.echo(f"model: {wrapped.info.name} · {wrapped.info.n_layers} layers · backend {wrapped.backend}")
    report = run_demo(out, wrapped)
    typer.echo(f"\nprompt: {report.prompt!r}")
    typer.echo("next-token prediction:")
    for token, p in report.top_tokens:
        typer.echo(f"  {token!r:>12}  {p:.3f}")
    typer.echo("\nlogit lens (log-probability at the last position, decoded from each layer):")
    for layer, row in enumerate(report.lens_layers):
        bars = "  ".join(f"{k!r}: {v:7.2f}" for k, v in row.items())
        typer.echo(f"  layer {layer:>2}  {bars}")
    typer.echo("\nfigures:")
    for path in report.figures:
        typer.echo(f"  {path}")


@app.command()
def sites(
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    backend: str = BACKEND,
    pattern: str = typer.Option("*", help="glob over site names, e.g. 'blocks.*.resid_post'"),
) -> None:
    """List the sites a model exposes, with their axes."""
    import mechkit
    from mechkit.errors import MechkitError

    try:
        wrapped = mechkit.load(model, backend=backend)
        chosen = wrapped.resolve(pattern)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    info = wrapped.info
    typer.echo(f"{info.name}: {info.architecture}, {info.n_layers} layers, d_model {info.d_model}, "
               f"{info.n_heads} heads" + (f", MoE layers {list(info.moe_layers)}" if info.moe_layers else ""))
    for site in chosen:
        typer.echo(f"  {site!s:<28} {' × '.join(site.axes)}")


@config_command(app, CollectConfig)
def cache(
    config: CollectConfig,
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    prompts: Path = typer.Option(..., help="text file (one prompt per line) or .jsonl with a 'prompt' field"),
    out: Path = typer.Option(..., help="ActivationStore folder (resumed if it exists)"),
    backend: str = BACKEND,
) -> None:
    """Collect activations for a prompt file into an on-disk ActivationStore."""
    import mechkit
    from mechkit.activations.collect import collect
    from mechkit.errors import MechkitError

    texts = _read_prompts(prompts)
    try:
        wrapped = mechkit.load(model, backend=backend)
        store = collect(wrapped, texts, out_dir=out, config=config)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {len(store)} token rows to {out}")


@config_command(app, SweepConfig)
def probe(
    config: SweepConfig,
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    dataset: Path = typer.Option(..., help="JSONL of items with 'prompt' and 'label' (e.g. probes/truth_hard.jsonl)"),
    out: Path = typer.Option(..., help="folder for result.json, tensors, sweep.csv and sweep.png"),
    backend: str = BACKEND,
) -> None:
    """Fit a linear probe at every site and write the layer curve, its concept depth and a plot."""
    import mechkit
    from mechkit import viz
    from mechkit.errors import MechkitError
    from mechkit.probing import probe_sweep

    try:
        wrapped = mechkit.load(model, backend=backend)
        result = probe_sweep(wrapped, dataset, config=config, concept=dataset.stem)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    result.save(out)
    frame = result.to_frame()
    frame.to_csv(out / "sweep.csv", index=False)
    viz.save(result.plot(), out / "sweep.png")
    typer.echo(frame[["site", "accuracy", "ci_low", "ci_high", "auroc"]].to_string(index=False, float_format="%.3f"))
    depth = result.concept_depth()
    jump = "none" if depth.jump is None else f"{depth.jump:.2f}"
    typer.echo(f"concept depth: jump {jump}, converging {depth.converging:.2f}, peak {depth.peak:.2f} "
               f"({depth.peak_accuracy:.3f}); chance {result.chance:.2f}")
    typer.echo(f"wrote {out}/sweep.png, sweep.csv, result.json")


@config_command(app, PatchConfig)
def patch(
    config: PatchConfig,
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    out: Path = typer.Option(..., help="folder for result.json, table.csv and figure.png"),
    task: str = typer.Option(None, help="a mechkit task with corruptions (ioi, colored_objects, ...)"),
    dataset: Path = typer.Option(None, help="JSONL of items with prompt, answer, corrupt_prompt (and corrupt_answer)"),
    n: int = typer.Option(32, help="prompt pairs generated from --task"),
    seed: int = typer.Option(0, help="seed of the generated pairs"),
    backend: str = BACKEND,
) -> None:
    """One activation-patching sweep on clean/corrupt pairs: scores, a heatmap and the top cells."""
    import mechkit
    from mechkit import tasks, viz
    from mechkit.errors import MechkitError
    from mechkit.patching import activation_patching, make_pairs

    if (task is None) == (dataset is None):
        _fail("pass exactly one of --task NAME or --dataset FILE.jsonl")
    try:
        items = tasks.TaskSet.from_jsonl(dataset) if dataset else tasks.generate(task, n, seed)
        wrapped = mechkit.load(model, backend=backend)
        result = activation_patching(wrapped, make_pairs(wrapped, items), config=config)
    except (MechkitError, LookupError, OSError, ValueError) as exc:
        _fail(str(exc))
    result.save(out)
    result.to_frame().to_csv(out / "table.csv", index=False)
    viz.save(result.plot(), out / "figure.png")
    typer.echo(result.top(10).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {out}/result.json, table.csv, figure.png")


@config_command(app, PathwayConfig)
def pathways(
    config: PathwayConfig,
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint folders in training order, or one model folder "
                                             "with checkpoints/index.json"),
    train: Path = typer.Option(None, help="JSONL of training samples (prompt, answer); default: the model "
                               "folder's split.safetensors (zoo models)"),
    test: Path = typer.Option(None, help="JSONL of test samples (prompt, answer); default: as --train"),
    out: Path = typer.Option(..., help="folder for result.json, tensors, table.csv, correlations.csv, figure.png"),
) -> None:
    """Memorization → generalization monitor: pathway distance and smoothness of memorized samples per checkpoint."""
    from mechkit import viz
    from mechkit.errors import MechkitError
    from mechkit.moe import pathway_monitor, split_samples

    try:
        if train is None or test is None:
            if len(checkpoints) != 1:
                _fail("without --train and --test give one zoo model folder (with card.json and split.safetensors)")
            zoo_train, zoo_test = split_samples(checkpoints[0])
        result = pathway_monitor(checkpoints[0] if len(checkpoints) == 1 else checkpoints,
                                 train or zoo_train, test or zoo_test, config)
    except (MechkitError, OSError) as exc:
        _fail(str(exc))
    result.save(out)
    result.to_frame().to_csv(out / "table.csv", index=False)
    table = result.correlations()
    table.to_csv(out / "correlations.csv", index=False)
    viz.save(result.plot(), out / "figure.png")
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    typer.echo(f"wrote {out}/result.json, table.csv, correlations.csv, figure.png")


@app.command("run")
def run(
    experiment: Path = typer.Argument(..., help="experiment YAML (see experiments/)"),
    out: Path = typer.Option(None, help="run folder (default: runs/<experiment name>); resumed if it exists"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Run a declarative experiment into a run folder: results, figures, summary and manifest."""
    from mechkit.errors import MechkitError
    from mechkit.report import Experiment, run_experiment

    try:
        exp = Experiment.from_file(experiment)
        folder = out or Path("runs") / exp.name
        run_experiment(exp, folder, progress=progress, log=typer.echo)
    except (MechkitError, ConfigError, LookupError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {folder}/summary.md, summary.html, manifest.json")


@config_command(sae_app, TrainConfig, name="train")
def sae_train(
    config: TrainConfig,
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    prompts: Path = typer.Option(..., help="text file (one prompt per line) or .jsonl with a 'prompt' field"),
    site: str = typer.Option(..., help="the site to train on, e.g. blocks.2.resid_post"),
    backend: str = BACKEND,
) -> None:
    """Collect activations of real tokens at SITE once, train an SAE on them, save it to OUT_DIR/sae."""
    import mechkit
    from mechkit.errors import MechkitError
    from mechkit.sae import train_sae

    if config.out_dir is None:
        _fail("pass --out-dir DIR: the trained SAE is saved in DIR/sae (its activations in DIR/activations)")
    texts = _read_prompts(prompts)
    try:
        train_sae(mechkit.load(model, backend=backend), site, config=config, prompts=texts)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {config.out_dir}/sae (sae-lens folder + mechkit.json)")


@config_command(sae_app, EvalConfig, name="eval")
def sae_eval(
    config: EvalConfig,
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    sae: Path = typer.Argument(..., help="SAE folder (sae-lens format, e.g. OUT_DIR/sae from `mechkit sae train`)"),
    prompts: Path = typer.Option(..., help="held-out prompts: text file or .jsonl with a 'prompt' field"),
    out: Path = typer.Option(..., help="folder for result.json, eval.csv and frequencies.png"),
    site: str = typer.Option(None, help="the SAE's site (default: the one recorded with the SAE)"),
    backend: str = BACKEND,
) -> None:
    """Evaluate an SAE in the model: L0, FVU, dead/dense latents, CE-loss recovered (zero and mean ablation), KL."""
    import mechkit
    from mechkit import viz
    from mechkit.errors import MechkitError
    from mechkit.sae import evaluate_sae

    texts = _read_prompts(prompts)
    try:
        loaded, site = _sae_and_site(sae, site)
        result = evaluate_sae(mechkit.load(model, backend=backend), loaded, site, texts, config=config)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    result.save(out)
    frame = result.to_frame()
    frame.to_csv(out / "eval.csv", index=False)
    viz.save(result.plot(), out / "frequencies.png")
    typer.echo(frame.round(4).T.to_string(header=False))
    typer.echo(f"wrote {out}/result.json, eval.csv, frequencies.png")


@sae_app.command("inspect")
def sae_inspect(
    model: str = typer.Argument(..., help="HF id, local folder or zoo:NAME"),
    sae: Path = typer.Argument(..., help="SAE folder (sae-lens format)"),
    prompts: Path = typer.Option(..., help="prompts to search: text file or .jsonl with a 'prompt' field"),
    out: Path = typer.Option(..., help="folder for top_contexts.html, frequencies.png and logit_effects.csv"),
    latents: str = typer.Option(None, help="comma-separated latent indices (default: the 20 most frequent)"),
    k: int = typer.Option(8, help="top contexts per latent"),
    site: str = typer.Option(None, help="the SAE's site (default: the one recorded with the SAE)"),
    backend: str = BACKEND,
) -> None:
    """Top-activating contexts (HTML), the firing-frequency histogram and the decoder logit effects of latents."""
    import mechkit
    from mechkit import viz
    from mechkit.errors import MechkitError
    from mechkit.sae import logit_effects, top_contexts

    texts = _read_prompts(prompts)
    try:
        chosen = [int(v) for v in latents.split(",")] if latents else None
    except ValueError:
        _fail(f"--latents {latents!r}: give comma-separated integers, e.g. 3,17,42")
    try:
        loaded, site = _sae_and_site(sae, site)
        wrapped = mechkit.load(model, backend=backend)
        contexts = top_contexts(wrapped, loaded, site, texts, k=k)
        if chosen is None:
            chosen = contexts.frequency.argsort(descending=True)[:20].tolist()
        effects = logit_effects(wrapped, loaded, chosen, k=10)
    except (MechkitError, LookupError, OSError) as exc:
        _fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    (out / "top_contexts.html").write_text("".join(contexts.html(i) for i in chosen))
    effects.to_frame().to_csv(out / "logit_effects.csv", index=False)
    from mechkit.sae.result import plot_frequencies

    fig = viz.figure()
    plot_frequencies(fig.add_subplot(), contexts.frequency, window=contexts.n_tokens)
    viz.save(fig, out / "frequencies.png")
    typer.echo(f"wrote {out}/top_contexts.html ({len(chosen)} latents), frequencies.png, logit_effects.csv")


def _sae_and_site(folder: Path, site: str | None) -> tuple[Any, str]:
    """The SAE saved in ``folder`` and its site: ``site`` if given, else the one recorded with it."""
    from mechkit.sae import load_sae

    loaded = load_sae(folder)
    site = site or (loaded.provenance.site if loaded.provenance else None)
    if site is None:
        _fail(f"{folder} records no site; pass --site")
    return loaded.sae, site


def _read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a JSONL file (a 'prompt' string per line)."""
    if path.is_dir():
        _fail(f"--prompts {path} is a folder; pass a text file with one prompt per line, or a .jsonl file")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        _fail(f"no prompt file at {path}")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read the prompt file {path} ({exc}); it must be UTF-8 text")
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        _fail(f"the prompt file {path} holds no prompts")
    if path.suffix != ".jsonl":
        return [line for _, line in numbered]
    return [_jsonl_prompt(path, i, line) for i, line in numbered]


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        _fail(f"{path} line {number} is not valid JSON ({exc.msg}); each line must be an object like "
              '{"prompt": "..."}')
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        _fail(f"{path} line {number} has no 'prompt' string (found {found}); each line must be an object like "
              '{"prompt": "..."}')
    return record["prompt"]


@zoo_app.command("list")
def zoo_list() -> None:
    """Bundled and real models."""
    from mechkit.zoo.registry import ZOO

    for entry in ZOO.values():
        typer.echo(f"{entry.name:<16} {entry.kind:<8} {entry.description}")


@zoo_app.command("show")
def zoo_show(name: str) -> None:
    """A model's card: recipe, seed, steps, measured metrics."""
    from mechkit.zoo import registry

    try:
        entry = registry.get(name)
        card = registry.resolve(name) / "card.json"
    except Exception as exc:
        _fail(str(exc))
    typer.echo(f"{entry.name} ({entry.kind}): {entry.description}")
    if card.exists():
        typer.echo(json.dumps(json.loads(card.read_text()), indent=2))


@zoo_app.command("train")
def zoo_train(
    name: str,
    out: Path | None = typer.Option(None, help="output folder (default: the zoo folder)"),
    smoke: bool = typer.Option(False, help="a few steps only, to check the recipe runs"),
) -> None:
    """Retrain a bundled model from scratch (resumes from its own checkpoints after an interrupt)."""
    from mechkit.zoo import registry

    result = registry.train(name, out, smoke=smoke)
    typer.echo(json.dumps(result, indent=2, default=str))


@zoo_app.command("eval")
def zoo_eval(name: str) -> None:
    """Re-measure a model's card metrics."""
    from mechkit.zoo import registry

    typer.echo(json.dumps(registry.evaluate(name), indent=2, default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
