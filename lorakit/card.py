"""The adapter folder's model card (README.md), as PEFT writes one: metadata the Hugging Face Hub and PEFT's tools
read (library_name: peft, base_model, tags), and how to load the adapter. Written only where the folder has none, so
a card the user wrote is never replaced."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorakit import atomic

CARD_NAME = "README.md"


def write_card(directory: str | Path, model: nn.Module, configs: dict[str, object]) -> None:
    """README.md in `directory` (one change, beside what the folder holds) unless it has one."""
    directory = Path(directory)
    if (directory / CARD_NAME).exists():
        return
    atomic.replace_folder(directory, {CARD_NAME: card_text(model, configs).encode()}, owned=set())


def card_text(model: nn.Module, configs: dict[str, object]) -> str:
    from lorakit import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    tags = sorted({"lora", "lorakit", *(getattr(model, "model_tags", None) or [])})
    meta = ([f"base_model: {json.dumps(base)}"] if base else []) + ["library_name: peft", "tags:"]
    meta += [f"- {json.dumps(tag)}" for tag in tags]
    if any(getattr(c, "task_type", None) == "CAUSAL_LM" for c in configs.values()):
        meta.append("pipeline_tag: text-generation")
    adapters = "\n".join(f"- `{name}`: {_summary(config)}" for name, config in configs.items())
    where = f" for `{base}`" if base else ""
    return (
        "---\n" + "\n".join(meta) + "\n---\n\n"
        f"# LoRA adapter{where}\n\n"
        "Adapter files in PEFT's format (adapter_config.json, adapter_model.safetensors; other adapters in subfolders "
        "named after them):\n\n"
        f"{adapters}\n\n"
        "Load with PEFT, `PeftModel.from_pretrained(base, folder)`, or with lorakit, "
        "`LoraModel.from_pretrained(base, folder)`.\n\n"
        f"### Framework versions\n\n- lorakit {__version__}\n"
    )


def _summary(config: object) -> str:
    targets = getattr(config, "target_modules", None)
    kind = "DoRA" if getattr(config, "use_dora", False) else getattr(config, "peft_type", "LORA")
    r, alpha = getattr(config, "r", "?"), getattr(config, "lora_alpha", "?")
    return f"{kind}, r={r}, lora_alpha={alpha}, target_modules={targets}"
