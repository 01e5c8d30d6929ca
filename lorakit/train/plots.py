"""PNG plots from metrics.jsonl: one run's loss and metric curves, and several runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.tracking import read_metrics


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib, or --run.plots=false") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r["kind"] == kind and key in r]
    return [s for s, _ in points], [v for _, v in points]


def _train_loss(ax: Any, records: list[dict[str, Any]], label: str) -> None:
    steps, values = _series(records, "train", "loss")
    # a short run logs a point or two, which a bare line would not show
    ax.plot(steps, values, marker="o" if len(steps) < 10 else None, markersize=4, label=label, alpha=0.8)


def plot_run(folder: Path, metric: str) -> list[Path]:
    """loss.png (train and eval loss per step) and <metric>.png (eval metric per step) in `folder`."""
    plt = _pyplot()
    records = read_metrics(folder)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    _train_loss(ax, records, "train loss")
    ax.plot(*_series(records, "eval", "loss"), "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{folder.name}: loss")
    ax.legend()
    written.append(_save(fig, folder / "loss.png", plt))
    steps, values = _series(records, "eval", metric)
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, "o-")
        ax.set(xlabel="optimizer step", ylabel=metric, title=f"{folder.name}: eval {metric}")
        written.append(_save(fig, folder / f"{metric}.png", plt))
    return written


def plot_compare(runs: dict[str, list[dict[str, Any]]], metric: str, out: Path) -> Path:
    """Train loss and eval `metric` of several runs in one figure, one line per run (by its label)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        _train_loss(left, records, label)
        right.plot(*_series(records, "eval", metric), "o-", label=label)
    left.set(xlabel="optimizer step", ylabel="train loss", title="training loss")
    right.set(xlabel="optimizer step", ylabel=metric, title=f"eval {metric}")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _save(fig, out, plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
