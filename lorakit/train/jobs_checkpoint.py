"""Checkpoints of a jobs file: each job's own checkpoint in its folder, and one file for the run they share.

A jobs run continues exactly only from one moment (trainer step T) for all its jobs at once: dropout masks are
drawn over every job's rows together, so the global RNG state and every job's weights, optimizer and schedule
must all be those of step T. Each job writes checkpoint.save's file into its own folder (keeping the one before as
previous.safetensors); then the run file is written, atomically, as the commit: step T, each job's position
(optimizer steps, micro-batches, the gradients, loss and examples of an unfinished accumulation, the losses not
yet logged) and the RNG state. A kill before the commit leaves the last run file, whose job checkpoints are then
the kept previous ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.multi.parallel import JobCounters, ParallelTrainer
from lorakit.train import checkpoint

RUN_FILE = "jobs-checkpoint.safetensors"  # in the jobs' common folder (the file's run.out_dir)
PREVIOUS_FILE = "previous.safetensors"  # in a job's checkpoint/ folder, beside checkpoint.STATE_FILE


@dataclass
class JobState:
    """Where one job stood at the run's checkpoint."""

    step: int  # optimizer steps done
    micro: int  # micro-batches taken
    loss: float  # summed loss of the unfinished accumulation
    examples: int
    window: list[float]  # step losses since the last train record: the next record is their mean


@dataclass
class RunState:
    """The run's checkpoint: trainer steps done, the base model's seed, every job's name, the unfinished jobs."""

    step: int
    seed: int
    names: list[str]
    jobs: dict[str, JobState]


def save(folder: Path, state: RunState, trainer: ParallelTrainer, job_folders: dict[str, Path]) -> None:
    """Every unfinished job's checkpoint into its folder, then the run file that makes them the current ones."""
    for name, job in state.jobs.items():
        target = job_folders[name] / checkpoint.CHECKPOINT_DIR
        if (target / checkpoint.STATE_FILE).is_file():
            os.replace(target / checkpoint.STATE_FILE, target / PREVIOUS_FILE)
        with _trainable_only(trainer, name):
            optimizer, scheduler = trainer.optimizer_of(name)
            checkpoint.save(job_folders[name], job.step, trainer.model, optimizer, scheduler, rank=0)
    rng_tensors, rng_json = checkpoint._rng_state()
    tensors = {f"rng.{k}": v for k, v in rng_tensors.items()}
    for name in state.jobs:  # gradients exist only mid-accumulation (an optimizer step sets them to None)
        grads = [p.grad for p in trainer.parameters_of(name)]
        tensors.update({f"grad.{name}.{i}": g for i, g in enumerate(grads) if g is not None})
    meta = {**asdict(state), "rng": rng_json}
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint._atomic_save(tensors, meta, folder / RUN_FILE)


def read(folder: Path, names: list[str], seed: int) -> tuple[RunState, dict[str, Tensor], dict]:
    """The run's checkpoint in `folder` (state, tensors, Python RNG state); refused when the jobs file no longer
    has the jobs or the seed it was made with."""
    path = folder / RUN_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no jobs checkpoint ({RUN_FILE}) to resume from; pass the folder the jobs file trained "
            "into (its run.out_dir), or train the file again with --overwrite"
        )
    tensors, meta = checkpoint._read(path)
    jobs = {name: JobState(**job) for name, job in meta["jobs"].items()}
    state = RunState(meta["step"], meta["seed"], meta["names"], jobs)
    differences = [f"job {n!r} removed" for n in state.names if n not in names]
    differences += [f"job {n!r} added" for n in names if n not in state.names]
    if state.seed != seed:
        differences.append(f"seed: {state.seed!r} -> {seed!r}")
    if differences:
        raise ConfigError(
            f"cannot resume {folder} with a different jobs file ({'; '.join(differences)}); resume with the file "
            "it was trained with, or train this one into another run.out_dir"
        )
    return state, tensors, meta["rng"]


def load_job(folder: Path, name: str, job: JobState, trainer: ParallelTrainer) -> None:
    """Job `name`'s weights, optimizer and schedule from its checkpoint of the run's step, and its position."""
    target = folder / checkpoint.CHECKPOINT_DIR
    if checkpoint.saved_step(folder) != job.step:
        previous = target / PREVIOUS_FILE
        if not (previous.is_file() and checkpoint._read(previous, tensors=False)[1]["step"] == job.step):
            raise ConfigError(
                f"job {name!r}: {folder} has no checkpoint of its step {job.step}, which the jobs checkpoint "
                "names; train the jobs file again with --overwrite"
            )
        os.replace(previous, target / checkpoint.STATE_FILE)  # the run was killed before committing a newer one
    with _trainable_only(trainer, name):
        optimizer, scheduler = trainer.optimizer_of(name)
        checkpoint.load(folder, trainer.model, optimizer, scheduler, rank=0)
    trainer.restore(name, JobCounters(job.micro, job.loss, job.examples))


def restore_run(trainer: ParallelTrainer, tensors: dict[str, Tensor], rng: dict) -> None:
    """The unfinished accumulations' gradients and the RNG state of the run's step (after every job is loaded)."""
    for key, grad in tensors.items():
        if key.startswith("grad."):  # "grad.<job>.<index>": job names have no dots
            _, name, index = key.split(".")
            param = trainer.parameters_of(name)[int(index)]
            param.grad = grad.to(param.device)
    own = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    checkpoint._set_rng_state(own, rng)


@contextmanager
def _trainable_only(trainer: ParallelTrainer, name: str) -> Iterator[None]:
    """Only job `name`'s parameters trainable: checkpoint.save and load take a model's trainable parameters."""
    mine = {id(p) for p in trainer.parameters_of(name)}
    frozen = [p for p in trainer.model.parameters() if p.requires_grad and id(p) not in mine]
    for param in trainer.parameters_of(name):
        param.requires_grad_(True)
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        trainer.train_live()
