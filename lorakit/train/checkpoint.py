"""Checkpoints that make `--resume` continue exactly: trainable weights, optimizer, scheduler, step and RNG.

Data order needs no state of its own: batches are a function of (seed, epoch, position) (data.batch_indices),
so the step count says which batch comes next. Like adapters, checkpoints are safetensors with JSON beside the
tensors (in the file's metadata) and nothing is ever unpickled. A checkpoint is ONE file: weights, optimizer,
scheduler, step and every rank's RNG state. It is written under a temporary name, flushed to disk and renamed
over the previous one, so a kill at any moment leaves either the old checkpoint or the new one, whole.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lorakit.errors import ConfigError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
# Keys that may differ between a run and its resumption: they change how it is shown, not what it computes.
RESUMABLE_DIFFERENCES = {"run.progress", "run.out_dir", "run.tensorboard", "run.wandb", "run.plots"}
_META = "lorakit.checkpoint"
# The trainable weights and their optimizer state, whole (gathered under FSDP), on the CPU, keyed by name.
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def save(folder: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, rank: int) -> None:
    """Rank 0 writes the one checkpoint file, holding every rank's RNG state (dropout differs per rank).

    Every rank must call this: under FSDP the full weights and optimizer state are gathered from all of them.
    """
    target = folder / CHECKPOINT_DIR
    weights, optim_state = get_state_dict(model, optimizer, options=_FULL)
    rng = _gather_rng()
    if rank != 0:
        return
    target.mkdir(parents=True, exist_ok=True)
    tensors = {f"trainable.{n}": t for n, t in _untied(model, weights).items()}
    optim_tensors, optim_json = _split(optim_state)
    tensors.update({f"optimizer.{k}": v for k, v in optim_tensors.items()})
    meta = {"step": step, "optimizer": optim_json, "scheduler": _jsonable(scheduler.state_dict(), "scheduler")}
    meta["rng"] = []
    for r, (rng_tensors, rng_json) in enumerate(rng):
        tensors.update({f"rng.{r}.{k}": v for k, v in rng_tensors.items()})
        meta["rng"].append(rng_json)
    _atomic_save(tensors, meta, target / STATE_FILE)


def saved_step(folder: Path) -> int | None:
    """The step of the checkpoint in run `folder`, or None when it has none."""
    path = folder / CHECKPOINT_DIR / STATE_FILE
    return int(_read(path, tensors=False)[1]["step"]) if path.is_file() else None


def load(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, rank: int) -> int:
    """Restores everything `save` wrote and returns the number of optimizer steps already done."""
    target = folder / CHECKPOINT_DIR
    if not (target / STATE_FILE).is_file():
        raise ConfigError(
            f"{folder} has no checkpoint to resume from (it stopped before its first one); start it again with "
            f"lorakit train {folder / 'config.toml'} --overwrite"
        )
    tensors, meta = _read(target / STATE_FILE)
    trainable = {k.removeprefix("trainable."): v for k, v in tensors.items() if k.startswith("trainable.")}
    trainable.update(_tied_copies(model, trainable))
    expected = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    if set(trainable) != expected:
        odd = sorted(set(trainable) ^ expected)[:3]
        raise ConfigError(f"the checkpoint in {folder} does not fit this model ({odd}); start a new run")
    optim_tensors = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    optim_state = _join(optim_tensors, meta["optimizer"])
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    if optim_state["state"]:
        set_state_dict(model, optimizer, model_state_dict=trainable, optim_state_dict=optim_state, options=options)
    else:  # no per-parameter state (SGD without momentum, or no step yet), which set_state_dict cannot load
        set_model_state_dict(model, trainable, options=options)
        groups = zip(optim_state["param_groups"], optimizer.state_dict()["param_groups"], strict=True)
        optimizer.load_state_dict({"state": {}, "param_groups": [{**g, "params": own["params"]} for g, own in groups]})
    scheduler.load_state_dict(meta["scheduler"])
    if rank < len(meta.get("rng", [])):
        prefix = f"rng.{rank}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        _set_rng_state(own, meta["rng"][rank])
    return int(meta["step"])


# -- tied weights: one tensor shared under two names (GPT-2's lm_head and wte) is stored once --------------------
def _aliases(model: nn.Module) -> dict[str, str]:
    """{duplicate name: first name} for every parameter that appears under more than one name."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def _untied(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    aliases = _aliases(model)
    return {n: t for n, t in weights.items() if n not in aliases}


def _tied_copies(model: nn.Module, trainable: dict[str, Tensor]) -> dict[str, Tensor]:
    return {dup: trainable[name] for dup, name in _aliases(model).items() if name in trainable}


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


# -- optimizer state: tensors to safetensors, the rest to JSON -------------------------------------------------------
def _split(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer state (keyed by parameter name) as {"<param>.<key>": tensor} plus JSON (param_groups, numbers)."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        plain[index] = {}
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
                plain[index][key] = None  # a tensor, stored under "<param>.<key>"
            else:
                plain[index][key] = _jsonable(value, f"optimizer state {key!r}")
    return tensors, {"state": plain, "param_groups": _jsonable(state["param_groups"], "optimizer param_groups")}


def _join(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {
        index: {key: tensors[f"{index}.{key}"] if value is None else value for key, value in values.items()}
        for index, values in plain["state"].items()
    }
    return {"state": state, "param_groups": plain["param_groups"]}


def _jsonable(value: Any, what: str) -> Any:
    """Checks that `value` survives JSON unchanged: a checkpoint must not silently lose state."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot checkpoint the {what}: {err}; use a torch.optim optimizer without it") from None
    if json.loads(text) != _listify(value):
        raise ConfigError(f"cannot checkpoint the {what}: it does not survive JSON")
    return value


def _listify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _listify(v) for k, v in value.items()}
    return value


# -- RNG -------------------------------------------------------------------------------------------------------------
def _gather_rng() -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Every rank's RNG state, on every rank (one rank: just its own)."""
    local = _rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ({k: v.cpu() for k, v in local[0].items()}, local[1]))
    return gathered


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# -- files -----------------------------------------------------------------------------------------------------------
def _atomic_save(tensors: dict[str, Tensor], meta: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={_META: json.dumps(meta, allow_nan=False)})
    with open(tmp, "rb") as handle:  # on disk before the rename: a crash cannot leave a renamed empty file
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        loaded = load_file(str(path)) if tensors else {}
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META])
    except (SafetensorError, KeyError, OSError, ValueError) as err:
        raise ConfigError(f"the checkpoint file {path} is damaged ({err}); start a new run") from None
    return loaded, meta
