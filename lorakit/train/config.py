"""TrainConfig: everything a run needs, as typed sections that load from TOML and take `--section.field=value`.

One flat dataclass per concern, so a config file reads like the table of contents of a run, and an unknown or
mistyped key fails at load time with the name of the key and the fix, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train import parallel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 has no tomllib
    import tomli as tomllib

TASKS = ("seq-cls", "causal-lm", "token-cls", "classification")
DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


@dataclass
class ModelSection:
    """source: a transformers folder, 'package.module:factory', or 'pkg://package/sub/folder' (data a package ships)."""

    source: str = ""  # a hub id ("gpt2") is passed to transformers; it needs the hub (offline: a local folder)
    tokenizer: str | None = None  # a folder with the tokenizer; defaults to `source` when that is a folder
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """Where the examples come from and how they become tensors.

    text_column / label_column: for token-cls they hold a list of words and a list of tags per row; for
    classification, feature_columns (or one column of arrays) are the inputs.
    """

    path: str = ""
    format: str = "auto"  # auto | csv | jsonl | json | parquet | text | disk | sklearn
    text_column: str = "text"
    prompt_column: str | None = None  # causal-lm: the instruction; text_column then holds the answer to learn
    label_column: str = "label"
    feature_columns: list[str] | None = None
    labels: list[Any] | None = None  # the classes, in order; None = the sorted distinct labels of the data
    other_labels: str = "error"  # error | drop: what to do with a row whose label is not in `labels`
    eval_path: str | None = None
    eval_fraction: float = 0.1
    eval_samples: int | None = None
    max_samples: int | None = None  # cap on training examples (for sweeps over data size)
    max_length: int = 128
    padding: str = "longest"  # longest | max_length
    pad_to_multiple_of: int | None = None  # longest, rounded up to a multiple of this (at most max_length)
    truncation: bool = True
    encoding: str = "utf-8"


@dataclass
class OptimSection:
    """The optimizer by its torch.optim name (or LoraFA), its schedule and the batch arithmetic."""

    name: str = "AdamW"  # a torch.optim name, or LoraFA (lorakit.optim.create_lorafa_optimizer)
    lr: float = 5e-4
    weight_decay: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra optimizer arguments, e.g. {momentum = 0.9}
    schedule: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; wins over epochs (0 or -1: from epochs)
    loraplus_lr_ratio: float | None = None  # LoRA+: the B factors learn at lr * this (the paper suggests 16)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the learning rate of adapters on embeddings
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16


@dataclass
class RunSection:
    """Where the run is written and what is tracked there."""

    out_dir: str = "runs/{time}"
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 100
    progress: str = "rich"  # rich | tqdm | none
    tensorboard: bool = True
    wandb: bool = False  # offline mode only: nothing leaves the machine
    plots: bool = True
    distributed: str = "ddp"  # under torchrun: ddp (a model copy per rank) | fsdp (FSDP2: the model sharded)
    compile: str = "auto"  # auto (on a GPU) | on | off: torch.compile each repeated block of the model
    compile_backend: str = "inductor"  # torch.compile's backend (e.g. aot_eager to debug a compile problem)
    compile_mode: str = "auto"  # auto (CUDA graphs where they hold) | default | reduce-overhead | max-autotune...
    fused_head_loss: str = "auto"  # auto | on | off: causal-lm head + loss in chunks, no full logits tensor


COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile_mode(run: RunSection) -> None:
    """A mode other than the default is inductor's (torch.compile passes no mode to another backend); "auto" picks
    one where it runs (train.loop)."""
    _check_choice("run.compile_mode", run.compile_mode, COMPILE_MODES)
    if run.compile_mode in ("auto", "default"):
        return
    if run.compile_backend != "inductor":
        raise ConfigError(
            f"run.compile_mode = {run.compile_mode!r} is a mode of the inductor backend, and run.compile_backend is "
            f"{run.compile_backend!r}; set run.compile_backend = 'inductor' or run.compile_mode = 'default'"
        )
    if run.compile == "off":
        raise ConfigError(
            f"run.compile = 'off' compiles nothing, so run.compile_mode = {run.compile_mode!r} would do nothing; set "
            "run.compile to 'auto' or 'on', or leave run.compile_mode at 'default'"
        )


@dataclass
class TrainConfig:
    task: str = "seq-cls"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: dict[str, Any] = field(default_factory=dict)  # LoraConfig's fields, PEFT's names
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice(
            "data.format", self.data.format, ("auto", "csv", "jsonl", "json", "parquet", "text", "disk", "sklearn")
        )
        _check_choice("data.other_labels", self.data.other_labels, ("error", "drop"))
        _check_choice("data.padding", self.data.padding, ("longest", "max_length"))
        _check_choice("optim.schedule", self.optim.schedule, ("linear", "cosine", "constant"))
        _check_choice("optim.precision", self.optim.precision, ("auto", "fp32", "bf16"))
        _check_choice("run.progress", self.run.progress, ("rich", "tqdm", "none"))
        _check_choice("run.distributed", self.run.distributed, parallel.MODES)
        _check_choice("run.compile", self.run.compile, ("auto", "on", "off"))
        _check_compile_mode(self.run)
        _check_choice("run.fused_head_loss", self.run.fused_head_loss, ("auto", "on", "off"))
        if self.run.fused_head_loss == "on" and self.task != "causal-lm":
            raise ConfigError(f"run.fused_head_loss = 'on' needs task 'causal-lm', not {self.task!r}; set it to 'auto'")
        for key in ("model.source", "data.path"):
            if not get_field(self, key):
                raise ConfigError(f"{key} is missing; set it in the config file or pass --{key}=...")
        for key in ("optim.batch_size", "optim.grad_accum", "run.eval_every", "run.log_every", "run.checkpoint_every"):
            if get_field(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {get_field(self, key)}")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        _check_numbers(self)
        _check_labels(self.data.labels)
        self.lora_config()  # a bad [lora] key fails now, not after the model has loaded

    def lora_config(self) -> LoraConfig:
        """The [lora] section as a LoraConfig; the task's PEFT task_type is filled in when left out."""
        # the base is recorded in adapter_config.json, so `lorakit merge` and readers know what it adapts
        base = {"base_model_name_or_path": self.model.source}
        values = {"task_type": _PEFT_TASK_TYPES.get(self.task), **base, **self.lora}
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"[lora] has unknown keys {unknown}; use LoraConfig's (PEFT's) field names: {sorted(known)}"
            )
        return LoraConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_out_dir(self) -> Path:
        """run.out_dir with {time} and {task} filled in, so the default never collides with an earlier run."""
        try:
            text = self.run.out_dir.format(time=datetime.now().strftime("%Y%m%d-%H%M%S"), task=self.task)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"run.out_dir {self.run.out_dir!r} has a placeholder lorakit cannot fill ({err!r}); only {{time}} "
                "and {task} are filled in (write {{ and }} for literal braces)"
            ) from None
        return Path(text).expanduser().absolute()


_PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "token-cls": "TOKEN_CLS"}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The TOML file at `path` (None: the embedded default run) with `section.field=value` overrides applied.

    Relative paths in the file mean relative to the file's folder (the embedded default's: the current
    directory); those given as overrides, relative to the current directory. Both are made absolute here, so
    the run folder records where everything was and works from any directory.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = tomllib.loads(_read_text(path))
    _absolute_paths(data, Path.cwd() if path == DEFAULT_CONFIG else path.absolute().parent)
    for override in overrides or []:
        _apply_override(data, override)
    return from_dict(data, source=str(path))


def _read_text(path: Path) -> str:
    """The config file's text, refusing what is not a readable UTF-8 regular file (a FIFO would block forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"no config file {path}; pass an existing .toml file, or none for the default run") from None
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path} ({err.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path} is a folder, not a config file; pass the .toml file (e.g. {path}/config.toml)")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path} is not a regular file (a pipe or device); pass a .toml file")
    try:
        text = path.read_bytes().decode("utf-8")
        tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path} ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err}); fix the line it names") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be a config file") from None
    return text


# Keys holding paths: data paths always; model paths only when that folder exists (else a hub id or a factory)
_PATH_KEYS = (("data", "path"), ("data", "eval_path"), ("run", "out_dir"))
_MODEL_PATH_KEYS = (("model", "source"), ("model", "tokenizer"))


def _absolute_paths(data: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_KEYS + _MODEL_PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = absolute_path(table[key], base, must_exist=(section, key) in _MODEL_PATH_KEYS)


def absolute_path(value: str, base: Path, must_exist: bool = False) -> str:
    """`value` made absolute against `base`, unless it is empty, a scheme (pkg://, sklearn://) or, with must_exist,
    names no existing path (then it is a hub id or 'package.module:factory' and stays as written)."""
    if not value.strip() or "://" in value:
        return value
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else base / path
    if must_exist and not resolved.exists():
        return value
    return os.path.normpath(resolved)


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Builds a TrainConfig, refusing unknown keys and values of the wrong type with the key's full name."""
    return _build(TrainConfig, data, prefix="", source=source)


def get_field(config: TrainConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def field_names() -> list[str]:
    """Every settable key as 'section.field' (and 'task', 'seed'), for overrides and their error messages."""
    names = []
    for f in dataclasses.fields(TrainConfig):
        section = _SECTIONS.get(f.name)
        names += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)] if section else [f.name]
    return names


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ConfigError(
            f"{source}: unknown key(s) {keys}; known keys: {', '.join(prefix + n for n in sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, hint, prefix + name, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Checks `value` against the field's type; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is Any or (isinstance(base, type) and isinstance(value, base) and not _bool_for_number(value, base)):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")


def _bool_for_number(value: Any, base: type) -> bool:
    return isinstance(value, bool) and base in (int, float)


def _apply_override(data: dict[str, Any], override: str) -> None:
    """`section.field=value`, the value read as TOML (so 3e-4, true, [1, 2] and "text" all work; bare words too)."""
    key, sep, raw = override.lstrip("-").partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} has no '='; write it as --section.field=value, e.g. --optim.lr=3e-4")
    key = _full_key(key.strip())
    value = _parse_value(raw.strip())
    if tuple(key.split(".")) in _PATH_KEYS + _MODEL_PATH_KEYS and isinstance(value, str):
        value = absolute_path(value, Path.cwd(), must_exist=tuple(key.split(".")) in _MODEL_PATH_KEYS)
    *sections, name = key.split(".")
    target = data
    for section in sections:
        target = target.setdefault(section, {})
    target[name] = value


def _full_key(key: str) -> str:
    """A key as written ('optim.lr', or a unique field name like 'lr') -> its full dotted name."""
    names = field_names()
    if key in names or key.startswith("lora."):
        return key
    matches = [n for n in names if n.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override key {key!r} is ambiguous: {matches}; write the full name")
    raise ConfigError(f"unknown override key {key!r}; known keys: {', '.join(names)}, or lora.<LoraConfig field>")


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word or path: a string


def _check_numbers(config: TrainConfig) -> None:
    """Settings that would run and silently train nothing, or nonsense, are refused before anything loads."""
    optim, data = config.optim, config.data
    _check_range("optim.lr", optim.lr, 0.0, 10.0, low_open=True, hint="typical LoRA rates are 1e-4 to 1e-2")
    _check_range("optim.weight_decay", optim.weight_decay, 0.0, math.inf)
    _check_range("optim.epochs", optim.epochs, 0.0, 1e6, low_open=True, hint="use max_steps for a fixed step count")
    _check_range("optim.warmup_ratio", optim.warmup_ratio, 0.0, 1.0)
    _check_range("optim.max_grad_norm", optim.max_grad_norm, 0.0, math.inf, hint="0 turns clipping off")
    if optim.loraplus_lr_ratio is not None:
        _check_range("optim.loraplus_lr_ratio", optim.loraplus_lr_ratio, 1.0, 1e6, hint="B's rate / A's rate")
    _check_range("optim.loraplus_lr_embedding", optim.loraplus_lr_embedding, 0.0, 10.0)
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if optim.max_steps is not None and optim.max_steps < -1:
        raise ConfigError(f"optim.max_steps must be >= 1 (or 0 / -1: from optim.epochs), got {optim.max_steps}")
    for key in ("data.max_samples", "data.eval_samples", "data.max_length", "data.pad_to_multiple_of"):
        value = get_field(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 (or left out), got {value}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in 0 .. 2**32 - 1 (torch's and numpy's range), got {config.seed}")
    if data.eval_fraction == 0 and not data.eval_path:
        raise ConfigError(
            "data.eval_fraction = 0 and no data.eval_path leaves no eval examples, and every run is judged on them; "
            "set data.eval_fraction (e.g. 0.1) or data.eval_path"
        )
    if not config.run.out_dir.strip():
        raise ConfigError("run.out_dir is empty (an unset variable?); set it to the folder the run should create")


def _check_labels(labels: list[Any] | None) -> None:
    """data.labels names each class once (labels compare as text, so 1 and "1" are one class)."""
    if labels is None:
        return
    if not labels:
        raise ConfigError("data.labels is empty; list the classes in order, or leave it out to use the labels found")
    texts = [str(label) for label in labels]
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise ConfigError(f"data.labels names {repeated} more than once; list each class once")


def _check_range(key: str, value: float, low: float, high: float, low_open: bool = False, hint: str = "") -> None:
    bad = not math.isfinite(value) or value > high or value < low or (low_open and value == low)
    if bad:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{key} must be a finite number in {interval}, got {value!r}" + (f"; {hint}" if hint else ""))


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def to_toml(config: TrainConfig) -> str:
    """The resolved config as TOML that load_config reads back to an equal TrainConfig."""
    top = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, section in config.to_dict().items():
        if isinstance(section, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in section.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise ConfigError(f"cannot write {value!r} to TOML")
