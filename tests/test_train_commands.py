"""The train / eval / compare / sweep commands, on a typer app that `register` fills (as the lorakit CLI does)."""

from __future__ import annotations

import json
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
    assert "no summary.json" in str(runner.invoke(app, ["compare", str(tmp_path)]).exception)


def test_an_override_without_its_value_never_takes_the_next_option(app: typer.Typer, config: Path) -> None:
    result = runner.invoke(app, ["train", str(config), "--run.out_dir", "--lr=0.02"])
    assert isinstance(result.exception, ConfigError)
    assert "override --run.out_dir has no value; write --run.out_dir=VALUE" in str(result.exception)
