"""Where numbers go during a run: metrics.jsonl (the record every other tool reads), TensorBoard, W&B offline,
and a progress bar. Only rank 0 tracks; the other ranks get a Tracker that does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.config import RunSection

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, folder: Path | None, run: RunSection, config: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        self._file = None
        self._tb = None
        self._wandb = None
        if folder is None:
            return
        self._file = (folder / METRICS_FILE).open("a" if resume else "w")
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder / "tensorboard"))
        if run.wandb:
            self._wandb = _wandb_offline(folder, config)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """One record: kind ('train', 'eval', ...), the optimizer step, and its values."""
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(f"{kind}/{name}", value, step)
                if self._wandb is not None:
                    self._wandb.log({f"{kind}/{name}": value}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def check_available(run: RunSection) -> None:
    """Fails before the run starts if a requested tracker is not installed."""
    if run.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "run.tensorboard needs tensorboard: pip install tensorboard, or --run.tensorboard=false"
            ) from None
    if run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("run.wandb needs wandb: pip install wandb, or leave run.wandb = false") from None


def _wandb_offline(folder: Path, config: dict[str, Any]) -> Any:
    """W&B in offline mode, as the seeds use it: files under the run folder, `wandb sync` uploads them later."""
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    return wandb.init(dir=str(folder), config=config, mode="offline", project="lorakit")


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a damaged line is named, since plots and compare read every one."""
    path = folder / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a run folder (no {METRICS_FILE}); pass a folder `lorakit train` wrote")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "kind" not in record:
                raise ConfigError(f"{path} line {number} is not a metrics record; the file is corrupt")
            records.append(record)
    return records


class Progress:
    """A bar over optimizer steps showing loss, lr and examples/s: rich, tqdm, or nothing.

    When stdout is not a terminal (CI, `tee`, `nohup`) a bar would print nothing until the end, so a bar becomes
    plain lines: one every `every` steps and one per evaluation, each with the time so far and left.
    """

    def __init__(self, kind: str, total: int, start: int, every: int = 10) -> None:
        if kind in ("rich", "tqdm") and not sys.stdout.isatty():
            kind = "lines"
        self.kind, self.total, self.done, self.every = kind, total, start, max(1, every)
        self._start, self._first = time.perf_counter(), start
        self._bar: Any = None
        if kind == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._bar = RichProgress(*columns, TextColumn("{task.fields[info]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
        elif kind == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, info: dict[str, float]) -> None:
        self.done += 1
        text = "  ".join(f"{k} {_short(v)}" for k, v in info.items())
        if self.kind == "rich":
            self._bar.update(self._task, advance=1, info=text)
        elif self.kind == "tqdm":
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self.kind == "lines" and (self.done % self.every == 0 or self.done == self.total):
            print(f"train step {self.done}/{self.total}  {text}  {self._times()}", flush=True)

    def eval(self, step: int, scores: dict[str, float]) -> None:
        """One line per evaluation: the bar shows none, and a long eval set should not look like a hang."""
        if self.kind == "none" or not scores:
            return
        line = f"eval at step {step}/{self.total}  " + "  ".join(f"{k} {_short(v)}" for k, v in scores.items())
        if self.kind == "rich":
            self._bar.console.print(line, markup=False, highlight=False)
        elif self.kind == "tqdm":
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _times(self) -> str:
        elapsed = time.perf_counter() - self._start
        steps = self.done - self._first
        left = elapsed / steps * (self.total - self.done) if steps else 0.0
        return f"elapsed {elapsed:.0f}s  left ~{left:.0f}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop() if self.kind == "rich" else self._bar.close()


def _short(value: float) -> str:
    return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.4g}"
