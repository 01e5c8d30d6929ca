"""`lorakit train jobs.toml`: several adapters trained together over one base model, each into its own run folder.

A jobs file is a train config plus `[[adapters]]`. The top-level sections are every job's defaults; each
`[[adapters]]` entry names its adapter and overrides what differs (data, lora, optim, run, seed):

    [[adapters]]
    name = "r4-lr1e-3"
    lora = { r = 4 }
    optim = { lr = 1e-3 }

One base model is loaded (with the file's seed) and every job trains its adapter on it through
lorakit.multi.parallel: one forward and one backward per step for all jobs. Each job's folder is the folder a
run of that job alone would write (config.toml, metrics.jsonl, plots, summary.json, adapter/), and its
config.toml reproduces it alone: `lorakit train <folder>/config.toml`.

Every job checkpoints every run.checkpoint_every of its steps and at its end, and then all unfinished jobs are
checkpointed together with the run's state (jobs_checkpoint), so `lorakit train jobs.toml --resume FOLDER` (FOLDER:
the jobs' common run.out_dir) continues every unfinished job exactly as if the run had not stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit import LoraModel
from lorakit.errors import ConfigError
from lorakit.multi.parallel import JobStep, ParallelJob, ParallelTrainer
from lorakit.names import check_adapter_name
from lorakit.train import jobs_checkpoint, loop, tasks
from lorakit.train.config import TrainConfig, _absolute_paths, _apply_override, _read_text, from_dict, get_field
from lorakit.train.data import batch_indices
from lorakit.train.plots import plot_run
from lorakit.train.tracking import Progress, Tracker, check_available

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 has no tomllib
    import tomli as tomllib

_JOB_KEYS = ("name", "seed", "data", "lora", "optim", "run")  # task and model are shared: one base, one head
_SHARED = ("optim.precision",)  # one forward for all jobs: one autocast


@dataclass
class Jobs:
    """A parsed jobs file: the seed the base model is built with, each job's name and full train config, and the
    jobs' common folder (the file's run.out_dir, which holds the run's checkpoint)."""

    seed: int
    configs: dict[str, TrainConfig]
    folder: Path


def is_jobs_file(path: str | Path | None) -> bool:
    """True for a TOML file with `[[adapters]]` (a plain train config has none)."""
    if path is None or not Path(path).is_file():
        return False
    try:
        return "adapters" in tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        return False  # load_config reports the syntax error with its line (or the encoding, or the read error)


def load_jobs(path: str | Path, overrides: list[str] | None = None) -> Jobs:
    """Every job's TrainConfig: the top-level sections (with `overrides`) under each entry's own keys; checked."""
    data = tomllib.loads(_read_text(Path(path)))
    entries = data.pop("adapters")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: write each job as an [[adapters]] table with at least a name")
    for table in (data, *entries):  # paths in the file are relative to its folder, as in a train config
        _absolute_paths(table, Path(path).absolute().parent)
    for override in overrides or []:
        _apply_override(data, override)
    out_dir = data.setdefault("run", {}).get("out_dir", "runs/{time}")
    # {time} once for all jobs, so they land side by side in one folder
    data["run"]["out_dir"] = out_dir.format(time=datetime.now().strftime("%Y%m%d-%H%M%S"), task=data.get("task"))
    configs: dict[str, TrainConfig] = {}
    for i, entry in enumerate(entries):
        name, config = _job_config(data, entry, f"{path} [[adapters]] #{i + 1}")
        if name in configs:
            raise ConfigError(f"{path}: two [[adapters]] are named {name!r}; give every job its own name")
        configs[name] = config
    _check_shared(configs, path)
    _check_folders(configs, path)
    return Jobs(int(data.get("seed", 0)), configs, Path(data["run"]["out_dir"]))


def _job_config(top: dict[str, Any], entry: dict[str, Any], where: str) -> tuple[str, TrainConfig]:
    unknown = sorted(set(entry) - set(_JOB_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; a job sets {list(_JOB_KEYS)} (task and model are shared by all)"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f'{where}: every [[adapters]] entry needs a name, e.g. name = "r8-lr1e-3"')
    check_adapter_name(name)  # before its folder is named after it
    merged = copy.deepcopy(top)
    merged["run"]["out_dir"] = str(Path(top["run"]["out_dir"]) / name)
    for key, value in entry.items():
        if key == "name":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return name, from_dict(merged, source=f"{where} ({name!r})")


def _check_shared(configs: dict[str, TrainConfig], path: str | Path) -> None:
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        for key in _SHARED:
            mine, theirs = get_field(config, key), get_field(first, key)
            if mine != theirs:
                raise ConfigError(
                    f"{path}: job {name!r} has {key} = {mine!r} but {first_name!r} has {theirs!r}; jobs share one "
                    f"base model, so set {key} once at the top of the file"
                )


def _check_folders(configs: dict[str, TrainConfig], path: str | Path) -> None:
    """Two jobs writing to one folder would overwrite each other's adapter and metrics: refused up front."""
    owners: dict[Path, str] = {}
    for name, config in configs.items():
        folder = Path(config.run.out_dir).resolve()
        if folder in owners:
            raise ConfigError(
                f"{path}: jobs {owners[folder]!r} and {name!r} both write to {config.run.out_dir}; give each job its "
                "own run.out_dir (or leave it out: each job then writes to <run.out_dir>/<name>)"
            )
        owners[folder] = name


_Saved = tuple[jobs_checkpoint.RunState, dict[str, Tensor], dict]  # jobs_checkpoint.read: state, tensors, RNG


# -- training --------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One job's run: its config, data, folder, tracker and timing."""

    name: str
    config: TrainConfig
    prepared: tasks.Prepared
    folder: Path
    max_steps: int
    per_epoch: int
    tracker: Tracker | None = None
    before: dict | None = None
    window: list[float] | None = None
    wait: float = 0.0
    resumed: jobs_checkpoint.JobState | None = None  # where a resumed job continues from
    finished: bool = False  # its adapter and summary are written


def train_file(path: Path, overrides: list[str], overwrite: bool = False, resume: Path | None = None) -> dict:
    """What `lorakit train jobs.toml` runs: every job of the file, each job's RunResult by name; with `resume` (the
    folder the file trained into: its run.out_dir as made), every unfinished job continues from its checkpoint."""
    if resume is not None:  # the folder it was made in, whatever {time} became
        overrides = [*overrides, f"run.out_dir={json.dumps(str(resume))}"]
    return train_jobs(load_jobs(path, overrides), overwrite=overwrite, resume=resume is not None)


def check_not_jobs_folder(folder: Path) -> None:
    """`lorakit train --resume FOLDER` without a config, where FOLDER holds a jobs file's runs: the file is needed."""
    if (folder / jobs_checkpoint.RUN_FILE).is_file() and not (folder / loop.CONFIG_FILE).is_file():
        raise ConfigError(
            f"{folder} holds the runs of a jobs file; resume them with that file: lorakit train JOBS.toml --resume "
            f"{folder} (or resume one job alone from its own folder, {folder}/<name>)"
        )


def train_jobs(jobs: Jobs, overwrite: bool = False, resume: bool = False,
               on_step: Callable[[int], None] | None = None) -> dict[str, loop.RunResult]:  # fmt: skip
    """Trains every job together over one base; nothing is written unless every job's setup works. With `resume`,
    continues the run checkpointed in jobs.folder (finished jobs are left as they are). `on_step(t)` is called
    after each step t of the trainer (one micro-batch of every live job)."""
    env = loop._setup_env()
    if env.world > 1:
        raise ConfigError("a jobs file trains in one process; run it without torchrun")
    saved, finished = _check_resume(jobs) if resume else (_check_new_run(jobs, overwrite), {})
    runs = [_prepare(name, config, overwrite, resume) for name, config in jobs.configs.items() if name not in finished]
    if not runs:  # every job had finished: resuming changes nothing
        return finished
    for run in runs:
        run.resumed = saved[0].jobs[run.name] if saved else None
    _check_same_classes(runs)
    first = runs[0].config
    base = tasks.build_model(replace(first, seed=jobs.seed), runs[0].prepared)
    model_size = (sum(p.numel() for p in base.parameters()), sum(p.nbytes for p in base.parameters()))
    for run in runs:  # labels beyond the head fail before any folder exists
        tasks.check_outputs(base, run.prepared, torch.device("cpu"))
    model = LoraModel(base).to(env.device)
    loop._gradient_checkpointing(model, first)  # the recomputed forward replays each step's routing
    trainer = ParallelTrainer(
        model,
        [_parallel_job(run, model, env) for run in runs],
        loss_fn=lambda logits, labels: tasks.score_logits(first.task, logits, labels).mean_loss(),
        forward_context=lambda: loop._autocast(first, env),
    )
    if saved is None:
        (jobs.folder / jobs_checkpoint.RUN_FILE).unlink(missing_ok=True)  # an earlier run's, in this folder
    for run in runs:
        _start(run, trainer, env, overwrite)
    if saved is None:
        torch.manual_seed(first.seed)  # dropout: the same in every run of this file
    else:
        jobs_checkpoint.restore_run(trainer, saved[1], saved[2])
    results = {**finished, **_loop(runs, trainer, env, model_size, jobs, saved[0].step if saved else 0, on_step)}
    return {name: results[name] for name in jobs.configs}


def _check_new_run(jobs: Jobs, overwrite: bool) -> None:
    """One jobs run per folder (its checkpoint is the folder's): a new one replaces another only with --overwrite."""
    if (jobs.folder / jobs_checkpoint.RUN_FILE).is_file() and not overwrite:
        raise ConfigError(
            f"{jobs.folder} holds the checkpoint of a jobs run; continue it with --resume {jobs.folder}, pass "
            "--overwrite to replace it, or choose another run.out_dir"
        )


def _check_resume(jobs: Jobs) -> tuple[_Saved, dict[str, loop.RunResult]]:
    """The run's checkpoint, and the finished jobs' results; refused, before anything changes, when the file
    differs from the one the run was made with (its jobs, seed, or any job's config)."""
    saved = jobs_checkpoint.read(jobs.folder, list(jobs.configs), jobs.seed)
    finished = {}
    for name, config in jobs.configs.items():
        folder = Path(config.run.out_dir)
        loop._check_folder(folder, config, overwrite=False, resume=True)
        if (folder / loop.SUMMARY_FILE).is_file():  # written last: the job is complete
            summary = json.loads((folder / loop.SUMMARY_FILE).read_text())
            finished[name] = loop.RunResult(**{**summary, "already_finished": True})
    return saved, finished


def _prepare(name: str, config: TrainConfig, overwrite: bool, resume: bool) -> _Job:
    check_available(config.run)
    folder = Path(config.run.out_dir)
    if not resume:  # a resumed job's folder is checked by _check_resume
        loop._check_folder(folder, config, overwrite, resume=False)
    prepared = tasks.prepare(config)
    optim = config.optim
    per_epoch = len(batch_indices(len(prepared.train), optim.batch_size, config.seed, 0))
    from_epochs = max(1, math.ceil(optim.epochs * per_epoch / optim.grad_accum))
    max_steps = optim.max_steps if optim.max_steps is not None and optim.max_steps > 0 else from_epochs
    return _Job(name, config, prepared, folder, max_steps, per_epoch)


def _check_same_classes(runs: list[_Job]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.prepared.classes != first.prepared.classes:
            raise ConfigError(
                f"job {run.name!r} has classes {run.prepared.classes} but {first.name!r} has {first.prepared.classes}; "
                "jobs share one model head: set the same data.labels in every job"
            )


def _parallel_job(run: _Job, model: LoraModel, env: loop._Env) -> ParallelJob:
    """The job for ParallelTrainer, with the optimizer and schedule a run of it alone would build."""
    config = run.config
    return ParallelJob(
        name=run.name,
        lora_config=config.lora_config(),
        batches=_batches(run, env, run.resumed.micro if run.resumed else 0),
        steps=run.max_steps,
        optimizer=lambda params: loop._optimizer(model, config),  # built while only this job trains
        scheduler=lambda optimizer: loop._scheduler(optimizer, config, run.max_steps),
        grad_accum=config.optim.grad_accum,
        max_grad_norm=config.optim.max_grad_norm,
        seed=config.seed,
    )


def _batches(run: _Job, env: loop._Env, start: int) -> Iterator[dict[str, Tensor]]:
    """The job's micro-batches from number `start`, in the order a run of it alone takes them (loop._batch), timed
    as data wait."""
    for k in range(start, run.max_steps * run.config.optim.grad_accum):
        start = time.perf_counter()
        batch = loop._batch(run.prepared, run.config, k, run.per_epoch, env)
        run.wait += time.perf_counter() - start
        yield batch


def _start(run: _Job, trainer: ParallelTrainer, env: loop._Env, overwrite: bool) -> None:
    """The job's folder, tracker and 'before' evaluation (of the base model with the job's fresh adapter); a resumed
    job's checkpoint, and its metrics up to it."""
    loop._start_folder(run.folder, run.config, overwrite, resume=run.resumed is not None)
    if run.resumed is not None:
        jobs_checkpoint.load_job(run.folder, run.name, run.resumed, trainer)
        loop._truncate_metrics(run.folder, run.resumed.step, run.max_steps, env)
        run.tracker = Tracker(run.folder, run.config.run, run.config.to_dict(), resume=True)
        run.before = loop._read_summary_before(run.folder)
        run.window = list(run.resumed.window)
        return
    run.tracker = Tracker(run.folder, run.config.run, run.config.to_dict(), resume=False)
    run.before = _evaluate(trainer, run, env)
    run.tracker.log("eval", 0, run.before)
    loop._write_json(run.folder / "before.json", run.before, env)
    run.window = []


@contextmanager
def _only(trainer: ParallelTrainer, name: str) -> Iterator[None]:
    """The model as job `name` alone sees it (for evaluation); the live jobs stay trainable afterwards."""
    trainer.model.set_adapter(name)
    try:
        yield
    finally:
        trainer.train_live()


def _evaluate(trainer: ParallelTrainer, run: _Job, env: loop._Env) -> dict:
    with _only(trainer, run.name):
        return loop.evaluate(trainer.model, run.prepared, run.config, env)


def _loop(runs: list[_Job], trainer: ParallelTrainer, env: loop._Env, model_size: tuple[int, int], jobs: Jobs,
          step: int, on_step: Callable[[int], None] | None) -> dict:  # fmt: skip
    """Trainer steps from `step` on until every job is done; a job's checkpoint step checkpoints the run."""
    by_name = {run.name: run for run in runs}
    progress = Progress(runs[0].config.run.progress, max(run.max_steps for run in runs), 0)
    start = time.perf_counter()
    # done before a kill let them write their summary: they were checkpointed at their last step
    results = {run.name: _finish(run, trainer, env, model_size, 0.0) for run in runs if run.name not in trainer.live}
    while trainer.live:
        t0 = time.perf_counter()
        reports = trainer.step()
        step += 1
        dt = time.perf_counter() - t0
        for name, report in reports.items():
            _after_step(by_name[name], report, trainer, env, dt)
        if any(r.step % by_name[name].config.run.checkpoint_every == 0 or r.done for name, r in reports.items()):
            _checkpoint(runs, trainer, jobs, step)
        for name, report in reports.items():
            if report.done:
                results[name] = _finish(by_name[name], trainer, env, model_size, time.perf_counter() - start)
        progress.update({"live jobs": len(trainer.live), "step s": dt})
        if on_step is not None:
            on_step(step)
    progress.close()
    return results


def _checkpoint(runs: list[_Job], trainer: ParallelTrainer, jobs: Jobs, step: int) -> None:
    """Every unfinished job at trainer step `step` (those done at it too, before their summary is written)."""
    states = {}
    for run in runs:
        if not run.finished:
            assert run.window is not None
            counters = trainer.counters(run.name)
            done = counters.micro // run.config.optim.grad_accum
            states[run.name] = jobs_checkpoint.JobState(
                done, counters.micro, counters.loss, counters.examples, list(run.window)
            )
    state = jobs_checkpoint.RunState(step, jobs.seed, list(jobs.configs), states)
    jobs_checkpoint.save(jobs.folder, state, trainer, {run.name: run.folder for run in runs})


def _after_step(run: _Job, report: JobStep, trainer: ParallelTrainer, env: loop._Env, dt: float) -> None:
    """The job's train record every log_every steps (mean loss since the last one) and its evals."""
    assert run.tracker is not None and run.window is not None
    run.window.append(report.loss)
    every = run.config.run
    if report.step % every.log_every == 0 or report.done:
        values = {"loss": sum(run.window) / len(run.window), "lr": report.lr, "grad_norm": report.grad_norm,
                  "examples_per_s": report.examples / dt}  # fmt: skip
        run.tracker.log("train", report.step, values)
        run.window = []
    if report.step % every.eval_every == 0 and not report.done:
        run.tracker.log("eval", report.step, _evaluate(trainer, run, env))


def _finish(run: _Job, trainer: ParallelTrainer, env: loop._Env, model_size: tuple[int, int],
            seconds: float) -> loop.RunResult:  # fmt: skip
    """The job's final eval, its adapter as an ordinary PEFT folder, plots and summary.json."""
    assert run.tracker is not None and run.before is not None
    after = _evaluate(trainer, run, env)
    run.tracker.log("eval", run.max_steps, after)
    run.tracker.close()
    adapter_bytes = _save_adapter(trainer.model, run)
    params = sum(p.numel() for p in trainer.parameters_of(run.name))
    metric, _ = tasks.primary_metric(run.config.task)
    result = loop.RunResult(
        folder=str(run.folder), task=run.config.task, metric=metric, before=run.before, after=after,
        trainable_params=params, total_params=model_size[0] + params, adapter_bytes=adapter_bytes,
        model_bytes=model_size[1], steps=run.max_steps, train_examples=len(run.prepared.train), seconds=seconds,
        step_seconds=seconds / run.max_steps, data_wait_fraction=run.wait / max(seconds, 1e-9),
        peak_memory_bytes=loop._peak_memory(env), baseline=tasks.majority_baseline(run.config.task, run.prepared),
    )  # fmt: skip
    if run.config.run.plots:
        plot_run(run.folder, metric)
    loop._write_json(run.folder / loop.SUMMARY_FILE, asdict(result), env)
    run.finished = True
    return result


def _save_adapter(model: LoraModel, run: _Job) -> int:
    """The job's adapter alone, written as 'default' (PEFT's layout: the files at the folder's top), atomically."""
    adapter = run.folder / loop.ADAPTER_DIR
    tmp = run.folder / (loop.ADAPTER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=[run.name])
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(tmp if run.name == "default" else tmp / run.name, adapter)
    shutil.rmtree(tmp, ignore_errors=True)
    return sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
