"""Generators and harnesses of the file fuzzing suite: tests/test_fuzz_files.py runs them briefly in CI,
benchmarks/fuzz_files.py runs many more cases and prints counts by outcome.

An outcome is "loaded", "refused: <LorakitError subclass>", or "BUG: <other exception>" (which the tests fail on).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraModel, atomic, get_lora_model
from lorakit.config import PEFT_UNSUPPORTED
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, read_config
from tests.cases import mlp

CASE_SECONDS = 10  # a case that takes longer is a hang


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int = CASE_SECONDS) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(action: Callable[[], object]) -> str:
    """Runs one case: 'loaded', 'refused: <error class>', or 'BUG: ...' for anything else (a hang included)."""
    try:
        with time_limit():
            action()
    except LorakitError as err:
        return f"refused: {type(err).__name__}"
    except Exception as err:  # noqa: BLE001 - the point is to classify every other exception as a bug
        return f"BUG: {type(err).__name__}: {str(err)[:300]}"
    return "loaded"


# -- adapter_config.json -------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_MODULES = st.sampled_from(["lin0", "lin1", "lin", "head", ".*", "lin[", "all-linear", ""])
_PLAUSIBLE = {  # values near the valid ones, so cases reach injection and not only the type checks
    "peft_type": st.sampled_from(["LORA", "VERA", "lora", "PREFIX_TUNING"]),
    "r": st.integers(-2, 70) | st.sampled_from([2**20, 2**21, 2**63]),
    "lora_alpha": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 64),
    "lora_dropout": st.floats(-0.5, 1.5),
    "target_modules": st.lists(_MODULES, max_size=3) | _MODULES,
    "exclude_modules": st.lists(_MODULES, max_size=2) | _MODULES,
    "target_parameters": st.lists(st.sampled_from(["lin0.weight", "lin1.bias", "nope.weight"]), max_size=2),
    "modules_to_save": st.lists(_MODULES, max_size=2),
    "bias": st.sampled_from(["none", "all", "lora_only", "some"]),
    "use_rslora": st.booleans() | st.sampled_from(["false", "true", 0, 1]),
    "use_dora": st.booleans() | st.sampled_from(["false", 1]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora", "eva", "corda", "loftq", "x"]),
    "rank_pattern": st.dictionaries(_MODULES, st.integers(-1, 9), max_size=2),
    "alpha_pattern": st.dictionaries(_MODULES, st.floats(allow_nan=True), max_size=2),
    "layers_to_transform": st.integers(-1, 3) | st.lists(st.integers(-1, 3), max_size=3),
    "variant": st.sampled_from(["lora", "lora_fa", "delta_lora", "vera", "dora"]),
    "task_type": st.sampled_from([None, "CAUSAL_LM", "SEQ_CLS", "CLS"]),
}
_KEYS = sorted(set(_PLAUSIBLE) | set(PEFT_UNSUPPORTED) | {f for f in LoraConfig.__dataclass_fields__})


@st.composite
def config_files(draw) -> bytes:
    """adapter_config.json bytes: mostly JSON objects of known keys with plausible or random values."""
    start = draw(st.sampled_from(["bytes", "valid", "valid", "valid", "random"]))
    if start == "bytes":
        return draw(st.binary(max_size=64))
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["lin0"]} if start == "valid" else {}
    keys = draw(st.lists(st.sampled_from(_KEYS) | st.text(max_size=10), max_size=3 if data else 10, unique=True))
    for key in keys:
        plausible = _PLAUSIBLE.get(key)
        data[key] = draw(plausible if plausible is not None and draw(st.booleans()) else json_values)
    return json.dumps(data).encode()


def load_config_case(folder: Path, content: bytes) -> str:
    """Reads the config and, when it reads, adapts a small model with it."""
    (folder / CONFIG_NAME).write_bytes(content)

    def action() -> None:
        config = read_config(folder)
        get_lora_model(mlp(), config)

    return outcome(action)


# -- adapter_model.safetensors -------------------------------------------------------------------------
def reference_adapter(folder: Path) -> bytes:
    """A real adapter folder (config + weights) for mutation; returns the weights file's bytes."""
    torch.manual_seed(0)
    model = get_lora_model(mlp(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.save_pretrained(folder)
    return (folder / WEIGHTS_NAME).read_bytes()


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "X", ""])
_SIZES = st.integers(-2, 64) | st.sampled_from([2**31, 2**62, 2**64])


@st.composite
def weight_files(draw, original: bytes) -> bytes:
    """A mutation of `original`: its header edited, its length field changed, bytes flipped, cut or added."""
    size = int.from_bytes(original[:8], "little")
    header, data = json.loads(original[8 : 8 + size]), original[8 + size :]
    kind = draw(st.sampled_from(["header", "header", "length", "flip", "cut", "append"]))
    if kind == "header":
        for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3)):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
            if field == "drop":
                header.pop(key, None)
            elif isinstance(header.get(key), dict) and field == "dtype":
                header[key] = header[key] | {"dtype": draw(_DTYPES)}
            elif isinstance(header.get(key), dict):
                value = draw(st.lists(_SIZES, max_size=3) | json_values)
                header[key] = header[key] | {field: value}
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + data
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + original[8:]
    if kind == "flip":
        raw = bytearray(original)
        for at in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[at] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "cut":
        return original[: draw(st.integers(0, len(original) - 1))]
    return original + draw(st.binary(min_size=1, max_size=64))


def load_weights_case(folder: Path, content: bytes) -> str:
    (folder / WEIGHTS_NAME).write_bytes(content)
    return outcome(lambda: LoraModel.from_pretrained(mlp(), folder))


# -- kill -9 during save_pretrained --------------------------------------------------------------------
class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(1024, 1024), nn.Linear(1024, 1024)


def big_adapters() -> dict[float, LoraModel]:
    """Two versions of one ~4 MiB adapter (r=256 on two 1024x1024 layers) that differ in alpha and in every
    factor, keyed by alpha."""
    versions = {}
    for alpha in (8.0, 16.0):
        torch.manual_seed(int(alpha))
        config = LoraConfig(r=256, lora_alpha=alpha, target_modules=["lin0", "lin1"], init_lora_weights=False)
        versions[alpha] = get_lora_model(_Wide(), config)
    return versions


def folder_state(folder: Path, versions: dict[float, LoraModel]) -> tuple[str, str]:
    """(what PEFT reads, what lorakit reads): 'alpha A' when config and weights are one version, else what's wrong."""
    try:
        alpha = json.loads((folder / CONFIG_NAME).read_text())["lora_alpha"]
        weights = load_file(folder / WEIGHTS_NAME)
    except Exception as err:  # noqa: BLE001 - any unreadable state is an outcome to report
        return (f"unreadable: {type(err).__name__}",) * 2
    key = "base_model.model.lin0.lora_A.weight"
    expected = versions[float(alpha)].model.lin0.adapters["default"].lora_A.detach()
    raw = f"alpha {alpha:g}" if torch.equal(weights[key], expected) else f"MIXED: config alpha {alpha:g}, other weights"
    try:
        read_config(folder)
    except LorakitError as err:
        return raw, f"refused: {type(err).__name__}"
    return raw, raw


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def kill_during_saves(folder: Path, kills: int, seed: int = 0, in_place: bool = False) -> list[dict]:
    """Saves the other version over the folder in a forked child and SIGKILLs it after a random delay within
    the save's duration; records the folder's state after each kill. The folder's parent holds only the folder.

    in_place: force lorakit.atomic's fallback for folders that cannot be swapped (files replaced one by one under
    a marker): PEFT may then read a mix, lorakit must read old or new or refuse.
    """
    versions = big_adapters()
    versions[8.0].save_pretrained(folder)
    swap = atomic._swap
    atomic._swap = (lambda stage, target: False) if in_place else swap
    try:
        duration = min(_timed_save(versions[alpha], folder) for alpha in (16.0, 8.0, 16.0, 8.0))  # quietest run
        return [_kill_once(folder, versions, random.Random(seed + i).uniform(0, duration)) for i in range(kills)]
    finally:
        atomic._swap = swap


def _kill_once(folder: Path, versions: dict[float, LoraModel], delay: float) -> dict:
    current = json.loads((folder / CONFIG_NAME).read_text())["lora_alpha"]
    other = 16.0 if current == 8 else 8.0
    finished = _save_in_child(versions[other], folder, delay)
    names = {f"alpha {current:g}": "old", f"alpha {other:g}": "new"}
    peft_view, lorakit_view = (names.get(view, view) for view in folder_state(folder, versions))
    return {"delay_s": delay, "finished": finished, "peft": peft_view, "lorakit": lorakit_view,
            "ok": {peft_view, lorakit_view} <= {"old", "new"}, "leftovers": leftovers(folder)}  # fmt: skip


def _timed_save(model: LoraModel, folder: Path) -> float:
    """How long a forked child takes to save and exit, which is the span the kills sample."""
    start = time.perf_counter()
    _save_in_child(model, folder, delay=None)
    return time.perf_counter() - start


def _save_in_child(model: LoraModel, folder: Path, delay: float | None) -> bool:
    """True if the child finished its save before the kill (None: no kill)."""
    pid = os.fork()
    if pid == 0:  # the child: save, then leave without running the parent's exit handlers
        code = 1
        try:
            model.save_pretrained(folder)
            code = 0
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
