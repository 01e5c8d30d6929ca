"""`lorakit train jobs.toml --resume FOLDER`: an interrupted jobs run continued from its checkpoints ends with the
losses, evals and adapters of the uninterrupted run, for jobs with different steps, checkpoint intervals, gradient
accumulation and log intervals, with dropout on (BERT's and LoRA's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from safetensors.torch import load_file
from test_parallel import _jobs_file as jobs_file
from test_train_helpers import tiny_bert
from typer.testing import CliRunner

from lorakit.errors import ConfigError
from lorakit.train import checkpoint, jobs_checkpoint
from lorakit.train.commands import register
from lorakit.train.jobs import load_jobs, train_file, train_jobs

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("short", "accum", "long")
SETTINGS = ["lora.lora_dropout=0.1", "run.plots=false"]  # on top of test_parallel's jobs file
# trainer steps (micro-batches): short ends at 3, accum at 8 (4 steps x 2), long at 6; the run is checkpointed
# at 2, 3, 4, 6 and 8; at 3 accum is halfway through an accumulation (its gradients go into the checkpoint)
_JOBS = """
    [[adapters]]
    name = "short"
    optim = { max_steps = 3 }
    run = { checkpoint_every = 2 }

    [[adapters]]
    name = "accum"
    seed = 1
    lora = { r = 2, target_modules = ["query", "key", "value"] }
    optim = { name = "SGD", lr = 0.05, batch_size = 5, max_steps = 4, grad_accum = 2, schedule = "cosine" }
    run = { checkpoint_every = 1 }

    [[adapters]]
    name = "long"
    optim = { max_steps = 6, warmup_steps = 2 }
    run = { checkpoint_every = 4, log_every = 2, eval_every = 3 }
"""


class Interrupted(Exception):
    """Stands for a kill after trainer step t."""


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with dropout on (test_parallel's has none)."""
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def _jobs_file(tmp: Path, bert: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return jobs_file(tmp, bert, _JOBS)


def _interrupt_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise Interrupted

    return on_step


def _records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_s")} for line in lines]


def _assert_same_runs(ours: Path, theirs: Path) -> None:
    for name in NAMES:
        got, expected = _records(ours / name), _records(theirs / name)
        assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in expected], name
        for a, b in zip(got, expected, strict=True):
            assert a.keys() == b.keys()
            numbers = {k: a[k] for k in a if k not in ("kind", "step")}
            assert numbers == pytest.approx({k: b[k] for k in numbers}, rel=1e-6, abs=1e-7), (name, a["step"])
        mine = load_file(ours / name / "adapter" / "adapter_model.safetensors")
        reference = load_file(theirs / name / "adapter" / "adapter_model.safetensors")
        assert mine.keys() == reference.keys()
        for key in mine:
            assert (mine[key] - reference[key]).abs().max() <= 1e-6, (name, key)


@pytest.fixture(scope="module")
def straight(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    path = _jobs_file(tmp_path_factory.mktemp("straight"), bert)
    train_jobs(load_jobs(path, SETTINGS))
    return path.parent / "runs"


@pytest.mark.parametrize("stop", [3, 5, 7])
def test_an_interrupted_jobs_run_resumes_to_the_uninterrupted_losses_and_adapters(
    tmp_path: Path, bert: Path, straight: Path, stop: int
) -> None:
    """Stopped after trainer step 3 (accum mid-accumulation, short just finished), 5 (resumed from 4: short
    finished, long between checkpoints) or 7 (resumed from 6: long finished too)."""
    path = _jobs_file(tmp_path, bert)
    with pytest.raises(Interrupted):
        train_jobs(load_jobs(path, SETTINGS), on_step=_interrupt_at(stop))
    runs = tmp_path / "runs"
    assert not (runs / "accum" / "adapter").exists()
    results = train_file(path, SETTINGS, resume=runs)
    assert [results[n].already_finished for n in NAMES] == [True, False, stop == 7]
    _assert_same_runs(runs, straight)


def test_a_jobs_run_killed_for_real_resumes_to_the_uninterrupted_run(
    tmp_path: Path, bert: Path, straight: Path
) -> None:
    """SIGKILLed in a child process after trainer step 5 (no handler or cleanup runs), then resumed from step 4."""
    path = _jobs_file(tmp_path, bert)
    kill_after_5 = (
        "import os, signal, sys; from lorakit.train.jobs import load_jobs, train_jobs; "
        "kill = lambda t: t == 5 and os.kill(os.getpid(), signal.SIGKILL); "
        "train_jobs(load_jobs(sys.argv[1], sys.argv[2:]), on_step=kill)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", kill_after_5, str(path), *SETTINGS], env=env, timeout=240)
    assert child.returncode == -signal.SIGKILL
    runs = tmp_path / "runs"
    assert not list(runs.rglob("*.tmp")) and not (runs / "long" / "summary.json").exists()
    train_file(path, SETTINGS, resume=runs)
    _assert_same_runs(runs, straight)


def test_a_kill_before_the_run_checkpoint_is_committed_resumes_from_the_one_before(
    tmp_path: Path, bert: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs' checkpoints of step 4 are written but not the run file naming them: resume starts from step 3,
    with the jobs' checkpoints kept from then."""
    path = _jobs_file(tmp_path, bert)
    atomic_save, commits = checkpoint._atomic_save, []

    def dies_at_the_fourth_commit(tensors, meta, target: Path) -> None:
        if target.name == jobs_checkpoint.RUN_FILE:
            commits.append(meta["step"])
            if len(commits) == 4:
                raise Interrupted
        atomic_save(tensors, meta, target)

    monkeypatch.setattr(checkpoint, "_atomic_save", dies_at_the_fourth_commit)
    with pytest.raises(Interrupted):
        train_jobs(load_jobs(path, SETTINGS))
    monkeypatch.setattr(checkpoint, "_atomic_save", atomic_save)
    runs = tmp_path / "runs"
    assert commits == [2, 3, 4, 6]
    assert checkpoint.saved_step(runs / "long") == 6  # newer than the committed run checkpoint (step 4)
    train_file(path, SETTINGS, resume=runs)
    _assert_same_runs(runs, straight)


def test_resuming_a_finished_jobs_run_is_a_no_op(tmp_path: Path, bert: Path) -> None:
    path = _jobs_file(tmp_path, bert)
    first = train_jobs(load_jobs(path, SETTINGS))
    runs = tmp_path / "runs"
    files = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    app = typer.Typer()
    register(app)
    out = CliRunner().invoke(
        app, ["train", str(path), *(f"--{s}" for s in SETTINGS), "--resume", str(runs)]
    )  # `lorakit train jobs.toml --resume`
    assert out.exit_code == 0, out.output
    assert all(name in out.output for name in NAMES)
    without_the_file = CliRunner().invoke(app, ["train", "--resume", str(runs)])
    assert "resume them with that file: lorakit train JOBS.toml --resume" in str(without_the_file.exception)
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == files
    again = train_file(path, SETTINGS, resume=runs)
    assert all(again[n].already_finished and again[n].after == first[n].after for n in NAMES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda text: text.replace("max_steps = 6,", "max_steps = 7,"), r"optim.max_steps: 6 -> 7"),
        (lambda text: text + '\n[[adapters]]\nname = "extra"\n', "job 'extra' added"),
        (lambda text: text.replace("seed = 0", "seed = 3", 1), r"seed: 0 -> 3"),
    ],
)
def test_resume_with_a_changed_jobs_file_is_refused(tmp_path: Path, bert: Path, change,
                                                    message: str) -> None:  # fmt: skip
    path = _jobs_file(tmp_path, bert)
    with pytest.raises(Interrupted):
        train_jobs(load_jobs(path, SETTINGS), on_step=_interrupt_at(5))
    runs = tmp_path / "runs"
    files = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    path.write_text(change(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        train_file(path, SETTINGS, resume=runs)
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == files


def test_a_new_jobs_run_in_the_folder_of_another_is_refused_without_overwrite(tmp_path: Path, bert: Path) -> None:
    path = _jobs_file(tmp_path, bert)
    with pytest.raises(Interrupted):
        train_jobs(load_jobs(path, SETTINGS), on_step=_interrupt_at(2))
    path.write_text(path.read_text().replace('name = "', 'name = "other-'))  # the same folder, other jobs
    with pytest.raises(ConfigError, match="holds the checkpoint of a jobs run; continue it with --resume"):
        train_jobs(load_jobs(path, SETTINGS))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([*NAMES, jobs_checkpoint.RUN_FILE])


def test_resume_without_a_jobs_checkpoint_is_refused(tmp_path: Path, bert: Path) -> None:
    path = _jobs_file(tmp_path, bert)
    with pytest.raises(ConfigError, match="has no jobs checkpoint"):
        train_file(path, SETTINGS, resume=tmp_path / "elsewhere")
