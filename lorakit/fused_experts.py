"""target_modules of MoE models whose experts transformers 5 fused, translated as PEFT 0.21 translates them.

transformers 5 stores a Mixtral-like block's experts as two 3-D parameters of one `experts` module (gate_up_proj,
down_proj) and its router as a module with a bare weight, where transformers 4 had nn.Linear layers (w1, w3, w2 and
gate). PEFT rewrites a config that names the old layers (or says "all-linear") into target_parameters on the new
ones before it adapts anything, and gate_up_proj, fused from two layers, gets twice the rank and alpha. lorakit
does the same, and records it in the config as PEFT does, so the same config adapts the same weights in both and
the saved file says what it adapts.
"""

from __future__ import annotations

import re

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetError
from lorakit.targets import find_module_targets

# PEFT 0.21's tables (_MOE_TARGET_MODULE_MAPPING, _MOE_FUSED_TARGETS in peft/utils/transformers_weight_conversion.py)
# and the model types it applies them to (those transformers converts with these two families' patterns; qwen2_moe
# itself is not one).
_RENAMED = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}
_FAMILY = dict.fromkeys(("mixtral", "minimax", "minimax_m2"), "mixtral") | dict.fromkeys(
    (
        "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "Dots3NoteTextModel", "afmoe", "ernie4_5_moe",
        "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "beam",
        "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel",
    ),
    "qwen2_moe",
)  # fmt: skip


def convert_moe_targets(model: nn.Module, config: LoraConfig) -> None:
    """Rewrites config's transformers 4 expert and router names (or "all-linear") into target_parameters on the
    fused weights, with gate_up_proj at len(fused) times the rank and alpha, as PEFT does; others stay as they are."""
    family = _FAMILY.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None or config.target_modules is None or config.peft_type != "LORA":
        return
    renamed = _RENAMED[family]
    names = config.target_modules
    if names == "all-linear":  # the linear layers' names, and the old ones that were linear layers in transformers 4
        names = sorted({path.rsplit(".", 1)[-1] for path, _ in find_module_targets(model, config)} | set(renamed))
    elif isinstance(names, str):
        return  # a regex: PEFT probes it against the old names, which lorakit does not (it matches what exists)
    old = {name: next((o for o in renamed if name == o or name.endswith("." + o)), None) for name in names}
    if not any(old.values()):
        return
    config.target_modules = sorted(name for name, o in old.items() if o is None)
    config.target_parameters = sorted(set(config.target_parameters or []) | {renamed[o] for o in old.values() if o})
    for fused, parts in _FUSED[family].items():
        present = {o for o in old.values() if o in parts}
        if present and len(present) < len(parts):
            raise TargetError(
                f"target_modules names {sorted(present)} but not {sorted(set(parts) - present)}: transformers 5 "
                f"fuses them into one weight, {fused}, which is adapted whole (as in PEFT); name all of them or none"
            )
        if present:  # each old layer's rank lives on in the fused weight, and alpha/r stays what it was
            key = rf".*\.{re.escape(fused)}"
            config.rank_pattern = {**(config.rank_pattern or {}), key: config.r * len(parts)}
            config.alpha_pattern = {**(config.alpha_pattern or {}), key: config.lora_alpha * len(parts)}
