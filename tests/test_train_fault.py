"""kill -9 at random moments of a checkpointed run, then --resume: the losses are exactly the uninterrupted run's.

The run saves a checkpoint after every step (each one a full atomic file write), so the random kills land in the
forward pass, the optimizer step, the checkpoint write and the metrics write alike. benchmarks/fuzz_train.py does
the same with many more kills and seeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_train_helpers import tabular_config, tabular_csv

from lorakit.train import checkpoint, load_config, train

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# The child trains with a short pause per step, so a run lasts long enough for a kill to land inside it
CHILD = (
    "import sys, time; from pathlib import Path; from lorakit.train import load_config, train; "
    "config, mode = sys.argv[1], sys.argv[2]; run = Path(load_config(config).run.out_dir); "
    "resume = run if mode == 'resume' else None; config = run / 'config.toml' if resume else config; "
    "train(load_config(config), overwrite=mode == 'overwrite', resume=resume, on_step=lambda d: time.sleep(0.02))"
)


def every_step_config(folder: Path, data: Path) -> Path:
    """24 steps with dropout, a checkpoint after every one: kills land in checkpoint writes as often as anywhere."""
    config = tabular_config(folder, data, "warmup_steps = 3")
    text = config.read_text().replace("max_steps = 6", "max_steps = 24")
    text = text.replace("checkpoint_every = 2", "checkpoint_every = 1").replace("r = 2", "r = 2\nlora_dropout = 0.2")
    config.write_text(text)
    return config


def train_losses(folder: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def start(config: Path, mode: str) -> subprocess.Popen:
    """A child process running `lorakit train` on `config`: mode fresh | overwrite | resume."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(config), mode], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def kill_when_training(child: subprocess.Popen, run: Path, delay: float) -> bool:
    """Waits until the run has started writing, kills it `delay` s later; False if it finished (or failed) first."""
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if child.poll() is not None:
        return False
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    return True


def next_mode(run: Path) -> str:
    """After a kill: resume from the checkpoint, or start over when the kill came before the first one."""
    return "resume" if checkpoint.saved_step(run) is not None else "overwrite"  # saved_step raises if damaged


def test_random_kills_then_resume_reproduce_the_uninterrupted_losses(tmp_path: Path) -> None:
    data = tabular_csv(tmp_path / "t.csv", n=120)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = train(load_config(every_step_config(tmp_path / "a", data)))
    config = every_step_config(tmp_path / "b", data)
    run = tmp_path / "b" / "run"
    rng = random.Random(8)  # fixed: the same kill moments on every CI run
    kills, mode = 0, "fresh"
    while kills < 3:
        child = start(config, mode)
        if not kill_when_training(child, run, rng.uniform(0.0, 0.4)):
            assert child.returncode == 0, child.stderr.read()[-2000:]
            break
        kills += 1
        mode = next_mode(run)
    if not (run / "summary.json").exists():
        child = start(config, mode)
        assert child.wait(timeout=240) == 0, child.stderr.read()[-2000:]
    assert kills >= 2
    assert train_losses(run) == train_losses(Path(straight.folder))  # exactly: same batches, RNG and state
    assert json.loads((run / "summary.json").read_text())["after"] == straight.after
