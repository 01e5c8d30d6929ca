"""transformers.Trainer and a LoraModel: adapter folders in its checkpoints, as PEFT's models get them.

Trainer writes an adapter folder (adapter_config.json + adapter_model.safetensors) into each checkpoint-N folder
only for PEFT's own class; for any other model it writes the whole state dict (model.safetensors), which is what it
resumes from. With `callbacks=[AdapterCheckpoints()]` each checkpoint also holds the adapter files, so
`LoraModel.from_pretrained(base, "out/checkpoint-500")` and PEFT's `PeftModel.from_pretrained` load it as they
would load PEFT's checkpoint; resuming is unchanged.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorakit.errors import LorakitError
from lorakit.model import LoraModel


class AdapterCheckpoints(TrainerCallback):
    """Saves the LoraModel's adapters (all of them, or `selected_adapters`) into every checkpoint Trainer writes,
    beside Trainer's own files, on the main process only."""

    def __init__(self, selected_adapters: list[str] | None = None) -> None:
        self.selected_adapters = selected_adapters

    def on_save(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        _lora_model(model).save_pretrained(folder, selected_adapters=self.selected_adapters)
        return control


def _lora_model(model: nn.Module | None) -> LoraModel:
    """The LoraModel inside what Trainer holds (DDP or accelerate wrap it in .module)."""
    while (
        model is not None and not isinstance(model, LoraModel) and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    if not isinstance(model, LoraModel):
        raise LorakitError(
            f"AdapterCheckpoints saves a lorakit LoraModel's adapters, but the Trainer's model is "
            f"{type(model).__name__}; pass get_lora_model(...)'s model to the Trainer, or drop the callback"
        )
    return model
