"""`lorakit train | eval | compare | sweep`: thin typer commands over lorakit.train; `register(app)` adds them.

Any config key can be overridden after the config file as `--section.field=value` (or `--field value` when the
field name is unique), e.g. `lorakit train my.toml --optim.lr=3e-4 --max_samples=500`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lorakit import LoraModel
from lorakit.errors import ConfigError
from lorakit.io import CONFIG_NAME
from lorakit.train import jobs, loop, tasks
from lorakit.train.config import load_config
from lorakit.train.loop import ADAPTER_DIR, CONFIG_FILE, SUMMARY_FILE, RunResult, evaluate, train
from lorakit.train.plots import plot_compare
from lorakit.train.tracking import read_metrics

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigArg = Annotated[
    Path | None, typer.Argument(metavar="[CONFIG]", help="A TOML config; none: the embedded default run")
]
_OVERRIDES = "Override any config key after it: --section.field=value (e.g. --optim.lr=3e-4)."


def register(app: typer.Typer) -> None:
    """Adds train, eval, compare and sweep to `app` (the `lorakit` command)."""
    app.command("train", context_settings=_EXTRA, help=f"Fine-tune with LoRA. {_OVERRIDES}")(train_command)
    app.command("eval", context_settings=_EXTRA, help=f"Evaluate a run or an adapter. {_OVERRIDES}")(eval_command)
    app.command("compare", help="Final metrics of several runs side by side, and their curves in one plot.")(
        compare_command
    )
    app.command("sweep", context_settings=_EXTRA, help=f"One run per rank or data size, then compare. {_OVERRIDES}")(
        sweep_command
    )


def train_command(
    ctx: typer.Context,
    config: ConfigArg = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run folder if it exists")] = False,
    resume: Annotated[Path | None, typer.Option(metavar="RUN", help="Continue RUN from its last checkpoint")] = None,
) -> None:
    config, overrides = _config_and_overrides(config, ctx.args)
    if jobs.is_jobs_file(config):  # [[adapters]]: several adapters over one base, a run folder each
        results = jobs.train_file(config, overrides, overwrite=overwrite, resume=resume)
        _console().print(compare_table({name: asdict(r) for name, r in results.items()}))
        return
    if resume is not None and config is None:
        jobs.check_not_jobs_folder(resume)
        config = resume / CONFIG_FILE  # the run's own resolved config
    result = train(load_config(config, overrides), overwrite=overwrite, resume=resume)
    print_report(result)


def eval_command(
    ctx: typer.Context,
    run_or_adapter: Annotated[Path, typer.Argument(metavar="RUN_OR_ADAPTER", help="A run folder or an adapter folder")],
    config: Annotated[Path | None, typer.Option(help="Config naming model and data (default: the run's own)")] = None,
) -> None:
    """Metrics of the base model and of base + adapter on the config's eval data."""
    adapter, config_file = _adapter_and_config(run_or_adapter, config)
    _check_plain_config(config_file, "lorakit eval")
    cfg = load_config(config_file, _overrides(ctx.args))
    prepared = tasks.prepare(cfg)
    model = LoraModel.from_pretrained(tasks.build_model(cfg, prepared), adapter)
    with model.disable_adapter():
        base = evaluate(model, prepared, cfg)
    tuned = evaluate(model, prepared, cfg)
    table = Table(title=f"{adapter} on {len(prepared.eval)} eval examples", title_justify="left", box=None)
    for column in ("", *tuned):
        table.add_column(column, justify="right")
    table.add_row("base model", *(f"{base[k]:.4f}" for k in tuned))
    table.add_row("with adapter", *(f"{tuned[k]:.4f}" for k in tuned))
    _console().print(table)


def compare_command(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run folders written by `lorakit train`")],
    plot: Annotated[
        Path | None, typer.Option(help="Write the curves of all runs to this image (.png, .svg, .pdf, .jpg)")
    ] = None,
) -> None:
    if plot is not None:
        _check_plot_path(plot)
    labels = _labels(runs)
    summaries = {label: _summary(run) for label, run in zip(labels, runs, strict=True)}
    _console().print(compare_table(summaries))
    if plot is not None:
        curves = {label: read_metrics(run) for label, run in zip(labels, runs, strict=True)}
        plot_compare(curves, _shared_metric(summaries, curves), plot)
        _console().print(f"plot: {plot}")


def sweep_command(
    ctx: typer.Context,
    config: ConfigArg = None,
    rank: Annotated[str | None, typer.Option(help="LoRA ranks, comma-separated: 1,2,4,8")] = None,
    samples: Annotated[str | None, typer.Option(help="Training-set sizes, comma-separated: 100,1000")] = None,
    out: Annotated[Path, typer.Option(help="Folder for one run per value and compare.png")] = Path("runs/sweep"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace run folders that exist")] = False,
) -> None:
    """Trains one run per value of --rank or --samples, then prints the comparison and writes compare.png."""
    if (rank is None) == (samples is None):
        raise ConfigError("pass exactly one of --rank 1,2,4,8 or --samples 100,1000")
    option, key, short, values = (
        ("rank", "lora.r", "r", rank) if rank is not None else ("samples", "data.max_samples", "n", samples)
    )
    numbers = _sweep_values(option, values)
    config, base_overrides = _config_and_overrides(config, ctx.args)
    _check_plain_config(config, "lorakit sweep")
    configs = {}  # every value's config and run folder checked before the first run trains
    for value in numbers:
        label = f"{short}={value}"
        folder = out / label.replace("=", "-")
        cfg = load_config(config, [*base_overrides, f"{key}={value}", f"run.out_dir={json.dumps(str(folder))}"])
        loop._check_folder(folder, cfg, overwrite, resume=False)
        configs[label] = cfg
    summaries, curves = {}, {}
    for label, cfg in configs.items():
        result = train(cfg, overwrite=overwrite)
        summaries[label], curves[label] = asdict(result), read_metrics(Path(cfg.run.out_dir))
    _console().print(compare_table(summaries))
    plot = plot_compare(curves, next(iter(summaries.values()))["metric"], out / "compare.png")
    _console().print(f"plot: {plot}")


# -- output ----------------------------------------------------------------------------------------------------------
def print_report(result: RunResult) -> None:
    """The end-of-run report: metric before/after, trainable parameters, adapter vs model size, run folder."""
    metric = result.metric
    baseline = result.baseline.get(metric)
    lines = [
        f"{metric}: {result.before.get(metric, float('nan')):.4f} before -> {result.after[metric]:.4f} after"
        + (f" (majority-class baseline {baseline:.4f})" if baseline is not None else ""),
        f"eval loss: {result.before.get('loss', float('nan')):.4f} before -> {result.after['loss']:.4f} after",
        f"trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
        f"({100 * result.trainable_params / result.total_params:.2f}%)",
        f"adapter on disk: {_size(result.adapter_bytes)} vs full model {_size(result.model_bytes)} "
        f"({result.model_bytes / max(result.adapter_bytes, 1):.0f}x smaller)",
        f"{result.steps} steps on {result.train_examples:,} examples in {result.seconds:.0f}s "
        f"({result.step_seconds:.3f}s/step"
        + (f", median {result.median_step_seconds:.3f}s" if result.median_step_seconds > 0 else "")
        + f", {100 * result.data_wait_fraction:.1f}% waiting for data"
        + (", compiled, CUDA graphs)" if result.cuda_graphs else ", compiled)" if result.compiled else ")"),
        f"run folder: {result.folder}  (adapter in {Path(result.folder) / ADAPTER_DIR})",
    ]
    console = _console()
    if result.already_finished:
        line = f"\n{result.folder} finished already ({result.steps} steps); nothing to do. Its report:"
        console.print(line, soft_wrap=True)
    else:
        console.print("\nDone.", style="bold green")
    for line in lines:
        console.print("  " + line, soft_wrap=True)


def compare_table(summaries: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, title="Runs", title_justify="left")
    for column in ("run", "metric", "before", "after", "eval loss", "trainable", "adapter", "steps", "time"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, s in summaries.items():
        metric = s["metric"]
        table.add_row(
            label,
            metric,
            f"{s['before'].get(metric, float('nan')):.4f}",
            f"{s['after'][metric]:.4f}",
            f"{s['after']['loss']:.4f}",
            f"{s['trainable_params']:,} ({100 * s['trainable_params'] / s['total_params']:.2f}%)",
            _size(s["adapter_bytes"]),
            str(s["steps"]),
            f"{s['seconds']:.0f}s",
        )
    return table


# -- helpers ---------------------------------------------------------------------------------------------------------
def _config_and_overrides(config: Path | None, args: list[str]) -> tuple[Path | None, list[str]]:
    """With unknown options allowed, a first override (`--lr=1`) lands in CONFIG; put it back with the others."""
    if config is not None and str(config).startswith("--"):
        return None, _overrides([str(config), *args])
    return config, _overrides(args)


def _overrides(args: list[str]) -> list[str]:
    """['--optim.lr=3e-4', '--lr', '3e-4'] -> ['optim.lr=3e-4', 'lr=3e-4']."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides are written --section.field=value")
        if "=" not in arg:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):  # the next option is not this one's value
                raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
            arg, i = f"{arg}={args[i + 1]}", i + 1
        out.append(arg[2:])
        i += 1
    return out


def _adapter_and_config(path: Path, config: Path | None) -> tuple[Path, Path]:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run folder (runs/<time>) or an adapter folder")
    _check_not_jobs_parent(path, "one of them to lorakit eval: {runs}")
    if (path / ADAPTER_DIR / CONFIG_NAME).is_file():  # a run folder
        return path / ADAPTER_DIR, config or path / CONFIG_FILE
    if (path / CONFIG_NAME).is_file():
        if config is None:
            raise ConfigError(f"{path} is an adapter folder; pass --config CONFIG.toml naming its base model and data")
        return path, config
    raise ConfigError(f"{path} is neither a run folder nor an adapter folder (no {CONFIG_NAME})")


def _labels(runs: list[Path]) -> list[str]:
    """Folder names when they tell the runs apart (short enough for a table and a legend), else full paths."""
    names = [run.resolve().name for run in runs]  # '.' and 'runs/a/' have names too
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def _summary(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        state = "is a file" if run.exists() else "does not exist"
        raise ConfigError(f"{run} {state}; pass run folders written by `lorakit train`")
    _check_not_jobs_parent(run, "them: lorakit compare {runs}")
    path = run / SUMMARY_FILE
    if not path.is_file():
        if not (run / CONFIG_FILE).is_file():
            raise ConfigError(f"{run} is not a run folder (no {CONFIG_FILE}); pass folders written by `lorakit train`")
        raise ConfigError(f"{run} has no {SUMMARY_FILE}: not a finished run (resume it with --resume {run})")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); the file is corrupt (lorakit eval {run} measures the adapter again)"
        ) from None
    missing = [k for k in _SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; it was not written by `lorakit train`")
    return summary


_SUMMARY_KEYS = ("metric", "before", "after", "trainable_params", "total_params", "adapter_bytes", "steps", "seconds")


def _check_not_jobs_parent(folder: Path, command: str) -> None:
    """A jobs file's folder holds one run folder per adapter; the command takes those, so name them."""
    if (folder / CONFIG_FILE).is_file() or not folder.is_dir():
        return
    runs = " ".join(str(p) for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file())
    if runs:
        raise ConfigError(f"{folder} holds run folders, not a run; pass {command.format(runs=runs)}")


def _check_plain_config(config: Path | None, command: str) -> None:
    """A jobs file describes several runs; eval and sweep take one run's config (a job's RUN/config.toml)."""
    if jobs.is_jobs_file(config):
        raise ConfigError(
            f"{config} is a jobs file ([[adapters]]); {command} takes one run's config, such as a job's own "
            "RUN/config.toml"
        )


def _sweep_values(option: str, values: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: integers, at least one, none twice (each value is one run folder)."""
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{option} takes integers separated by commas (e.g. 1,2,4), got {values!r}") from None
    if not numbers:
        raise ConfigError(f"--{option} names no value; pass integers separated by commas, e.g. --{option} 1,2,4")
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        raise ConfigError(f"--{option} names {', '.join(map(str, twice))} twice; each value is one run, name it once")
    return numbers


def _check_plot_path(plot: Path) -> None:
    """Refused before anything runs: matplotlib picks the format from the suffix, and appends .png to none."""
    if plot.is_dir():
        raise ConfigError(f"--plot {plot} is a folder; pass a file path such as {plot / 'compare.png'}")
    if plot.suffix.lower() not in _PLOT_SUFFIXES:
        raise ConfigError(f"--plot {plot} must end in one of {', '.join(_PLOT_SUFFIXES)} (the image format)")


_PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def _shared_metric(summaries: dict[str, dict[str, Any]], curves: dict[str, list[dict[str, Any]]]) -> str:
    """The first run's metric when every run logged it, else the eval loss (every task has one), so runs of
    different tasks each get a curve."""
    metric = next(iter(summaries.values()))["metric"]
    logged = all(any(r.get("kind") == "eval" and metric in r for r in records) for records in curves.values())
    return metric if logged else "loss"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _console() -> Console:
    """Off a terminal (a pipe, a file) tables are as wide as their numbers, never cut to 80 columns with '…'."""
    console = Console(markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console.width = 1000
    return console
