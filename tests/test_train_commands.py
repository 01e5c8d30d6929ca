"""The train / eval / compare / sweep commands, on a typer app that `register` fills (as the lorakit CLI does)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import typer
from test_train_helpers import sentiment_csv, seq_cls_config, tiny_bert
from typer.testing import CliRunner

from lorakit.errors import ConfigError
from lorakit.train import load_config
from lorakit.train.commands import register

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cmd")
    return seq_cls_config(tmp, tiny_bert(tmp / "bert"), sentiment_csv(tmp / "s.csv"))


def test_train_prints_the_report_and_overrides_apply(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), f"--run.out_dir={out}", "--lr", "0.02", "--max_steps=3"])
    assert result.exit_code == 0, result.output
    for text in ("accuracy:", "before ->", "trainable parameters: 1,090 of", "adapter on disk:", f"run folder: {out}"):
        assert text in result.output
    summary = json.loads((out / "summary.json").read_text())
    baseline = summary["baseline"]["accuracy"]
    assert f"(majority-class baseline {baseline:.4f})" in result.output
    saved = (out / "config.toml").read_text()
    batch = load_config(out / "config.toml").optim.batch_size
    rates = [r["examples_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]  # fmt: skip
    assert len(rates) == 3  # each step's time is batch / rate: the median is the middle one
    assert summary["median_step_seconds"] == pytest.approx(statistics.median(batch / r for r in rates), rel=1e-9)
    assert f"s/step, median {summary['median_step_seconds']:.3f}s," in result.output
    assert "lr = 0.02" in saved and "max_steps = 3" in saved


def test_train_refuses_an_existing_folder_then_resume_and_eval(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), f"--run.out_dir={out}"]).exit_code == 0
    again = runner.invoke(app, ["train", str(config), f"--run.out_dir={out}"])
    assert isinstance(again.exception, ConfigError) and "pass --overwrite" in str(again.exception)
    metrics = (out / "metrics.jsonl").read_text()
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0 and f"{out} finished already (8 steps); nothing to do" in resumed.output
    assert (out / "metrics.jsonl").read_text() == metrics
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    after = json.loads((out / "summary.json").read_text())["after"]["accuracy"]
    assert "base model" in result.output and f"{after:.4f}" in result.output


def test_eval_of_a_bare_adapter_needs_a_config(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner.invoke(app, ["train", str(config), f"--run.out_dir={out}", "--max_steps=2"])
    bare = runner.invoke(app, ["eval", str(out / "adapter")])
    assert "pass --config" in str(bare.exception)
    assert runner.invoke(app, ["eval", str(out / "adapter"), "--config", str(out / "config.toml")]).exit_code == 0


def test_sweep_over_ranks_then_compare_with_a_plot(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sweep", str(config), "--rank", "1,4", "--out", str(tmp_path), "--max_steps=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare.png").is_file() and "r=1" in result.output and "r=4" in result.output
    compared = runner.invoke(
        app, ["compare", str(tmp_path / "r-1"), str(tmp_path / "r-4"), "--plot", str(tmp_path / "c.png")]
    )
    assert compared.exit_code == 0, compared.output
    assert (tmp_path / "c.png").stat().st_size > 1000 and "r-4" in compared.output


def test_sweep_and_compare_bad_input(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    assert "exactly one of" in str(runner.invoke(app, ["sweep", str(config)]).exception)
    assert "takes integers" in str(runner.invoke(app, ["sweep", str(config), "--samples", "1,a"]).exception)
    assert "is not a run folder (no config.toml)" in str(runner.invoke(app, ["compare", str(tmp_path)]).exception)


def test_an_override_without_its_value_never_takes_the_next_option(app: typer.Typer, config: Path) -> None:
    result = runner.invoke(app, ["train", str(config), "--run.out_dir", "--lr=0.02"])
    assert isinstance(result.exception, ConfigError)
    assert "override --run.out_dir has no value; write --run.out_dir=VALUE" in str(result.exception)


# -- hostile input: what a careless script passes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(app: typer.Typer, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "a-run-folder-with-a-rather-long-name"
    assert runner.invoke(app, ["train", str(config), f"--run.out_dir={out}", "--max_steps=2"]).exit_code == 0
    return out


def _error(app: typer.Typer, args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    return str(result.exception)


def test_sweep_checks_every_value_before_the_first_run(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    sweep = ["sweep", str(config), "--out", str(tmp_path), "--max_steps=1"]
    assert "--rank names no value" in _error(app, [*sweep, "--rank", ",,"])
    assert "--rank names 2 twice" in _error(app, [*sweep, "--rank", "2,2"])
    assert "--rank takes integers" in _error(app, [*sweep, "--rank", "1.5"])
    assert "r must be a positive integer, got 0" in _error(app, [*sweep, "--rank", "2,0"])
    (tmp_path / "n-8").mkdir()
    (tmp_path / "n-8" / "mine.txt").write_text("keep")
    assert "n-8 exists" in _error(app, [*sweep, "--samples", "16,8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n-8"]  # nothing trained: r-2 and n-16 never started
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(config.read_text() + '\n[[adapters]]\nname = "a"\n')
    assert "is a jobs file" in _error(app, ["sweep", str(jobs_file), "--rank", "1"])


def test_compare_and_eval_name_what_is_wrong_with_a_run(app: typer.Typer, finished: Path, tmp_path: Path) -> None:
    assert "does not exist" in _error(app, ["compare", str(finished), str(tmp_path / "nope")])
    assert "is a file" in _error(app, ["compare", str(finished / "summary.json")])
    assert "does not exist" in _error(app, ["eval", str(tmp_path / "nope")])
    jobs = tmp_path / "jobs"
    for name in ("a", "b"):
        shutil.copytree(finished, jobs / name)
    assert f"pass them: lorakit compare {jobs / 'a'} {jobs / 'b'}" in _error(app, ["compare", str(jobs)])
    assert f"pass one of them to lorakit eval: {jobs / 'a'}" in _error(app, ["eval", str(jobs)])
    (jobs / "a" / "summary.json").write_text('{"metric": "accuracy"')
    assert "summary.json is not valid JSON" in _error(app, ["compare", str(jobs / "a")])
    (jobs / "a" / "summary.json").write_text('{"metric": "accuracy"}')
    assert "lacks before, after" in _error(app, ["compare", str(jobs / "a")])
    with (jobs / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "tr')  # a line cut short
    lines = len((jobs / "b" / "metrics.jsonl").read_text().splitlines())
    assert f"metrics.jsonl line {lines} is not a metrics record" in _error(
        app, ["compare", str(jobs / "b"), "--plot", str(tmp_path / "c.png")]
    )


def test_compare_plot_path_is_checked_first(app: typer.Typer, finished: Path, tmp_path: Path) -> None:
    assert "--plot" in _error(app, ["compare", str(finished), "--plot", str(tmp_path / "curves.txt")])
    assert "is a folder" in _error(app, ["compare", str(finished), "--plot", str(tmp_path)])
    assert not list(tmp_path.iterdir()) and not tmp_path.with_suffix(".png").exists()


def test_compare_prints_whole_numbers_off_a_terminal(app: typer.Typer, finished: Path) -> None:
    result = runner.invoke(app, ["compare", str(finished)])
    assert result.exit_code == 0, result.output
    summary = json.loads((finished / "summary.json").read_text())
    row = next(line for line in result.output.splitlines() if finished.name in line)
    assert f"{summary['trainable_params']:,} (" in row and "…" not in result.output


def test_compare_plots_runs_of_different_tasks_on_a_metric_they_share() -> None:
    """A causal LM logs perplexity, a classifier does not: the eval loss is the curve both have."""
    from lorakit.train.commands import _shared_metric

    lm = [{"kind": "eval", "step": 1, "loss": 2.0, "accuracy": 0.1, "perplexity": 7.4}]
    cls = [{"kind": "eval", "step": 1, "loss": 0.6, "accuracy": 0.7}]
    summaries = {"lm": {"metric": "perplexity"}, "cls": {"metric": "accuracy"}}
    assert _shared_metric(summaries, {"lm": lm, "cls": cls}) == "loss"
    assert _shared_metric({"cls": {"metric": "accuracy"}, "lm": {}}, {"cls": cls, "lm": lm}) == "accuracy"
