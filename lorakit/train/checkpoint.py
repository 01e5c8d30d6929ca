"""Checkpoints that make `--resume` continue exactly: trainable weights, optimizer, scheduler, step and RNG.

Data order needs no state of its own: batches are a function of (seed, epoch, position) (data.batch_indices),
so the step count says which batch comes next. Files are written to a temporary name and renamed, so an
interruption mid-write leaves the previous checkpoint intact. Loading uses weights_only (no pickle code runs).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError

CHECKPOINT_DIR = "checkpoint"
# Keys that may differ between a run and its resumption: they change how it is shown, not what it computes.
RESUMABLE_DIFFERENCES = {"run.progress", "run.out_dir", "run.tensorboard", "run.wandb", "run.plots"}


def save(folder: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, rank: int) -> None:
    """Rank 0 writes the shared state; every rank writes its own RNG state (dropout differs per rank)."""
    target = folder / CHECKPOINT_DIR
    target.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        state = {
            "step": step,
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        _atomic_save(state, target / "state.pt")
    _atomic_save(_rng_state(), target / f"rng-rank{rank}.pt")


def load(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, rank: int) -> int:
    """Restores everything `save` wrote and returns the number of optimizer steps already done."""
    target = folder / CHECKPOINT_DIR
    if not (target / "state.pt").is_file():
        raise ConfigError(f"{folder} has no checkpoint to resume from; start a new run without --resume")
    state = torch.load(target / "state.pt", weights_only=True)
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ConfigError(f"the checkpoint in {folder} does not fit this model (no {missing[:3]}); start a new run")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = target / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return int(state["step"])


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for every setting that differs, except those in RESUMABLE_DIFFERENCES."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and name != "lora":
            out += config_differences(a, b, f"{name}.")
        elif a != b and name not in RESUMABLE_DIFFERENCES:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants tuples all the way down; a saved state may come back with lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
