"""Can vLLM serve this adapter folder (`vllm serve BASE --enable-lora --lora-modules name=path`)? And why not.

The rules follow what vLLM's loader (its PEFTHelper) accepts: plain LoRA factors of modules, one scale
lora_alpha / r (or / sqrt(r) with rsLoRA) for every module, no bias, no fully trained modules, no DoRA, and a
rank within --max-lora-rank (16 by default; 512 at most).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


@dataclass
class VllmVerdict:
    """servable, the reasons it is not (each with what to do), and notes for serving it (flags, caveats)."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def servable(self) -> bool:
        return not self.reasons


def vllm_servability(config: Any, weights: dict[str, Tensor]) -> VllmVerdict:
    """The verdict for an adapter given its config (lorakit.io.read_config) and tensors (read_weights)."""
    verdict = VllmVerdict()
    if config.peft_type != "LORA":
        verdict.reasons.append(f"vLLM serves LoRA adapters only, this is {config.peft_type}; merge it into the base")
        return verdict
    _features(config, verdict)
    _scales(config, verdict)
    _tensors(weights, verdict)
    return verdict


def _features(config: Any, verdict: VllmVerdict) -> None:
    merge = "; merge it into the base (lorakit merge) and serve the merged model"
    if config.use_dora:
        verdict.reasons.append(f"vLLM does not support DoRA (use_dora=true){merge}")
    if config.modules_to_save:
        verdict.reasons.append(f"vLLM refuses modules_to_save ({', '.join(config.modules_to_save)}){merge}")
    if config.bias != "none":
        verdict.reasons.append(f"vLLM loads no adapter biases (bias={config.bias!r}){merge}")
    if config.target_parameters:
        verdict.reasons.append(f"vLLM adapts modules, not parameters (target_parameters){merge}")
    if getattr(config, "variant", "lora") == "delta_lora":
        verdict.reasons.append(f"a Delta-LoRA adapter carries trained base weights, which vLLM cannot load{merge}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        verdict.reasons.append(
            f"init_lora_weights={init!r} changed the base weights; save with path_initial_model_for_weight_conversion "
            "to get a plain LoRA against the original base"
        )


def _scales(config: Any, verdict: VllmVerdict) -> None:
    ranks = {config.r, *config.rank_pattern.values()}
    base_scale = config.scale(config.r, config.lora_alpha)
    for pattern in sorted(set(config.rank_pattern) | set(config.alpha_pattern)):
        r = config.rank_pattern.get(pattern, config.r)
        if abs(config.scale(r, config.alpha_pattern.get(pattern, config.lora_alpha)) - base_scale) > 1e-12:
            verdict.reasons.append(
                f"modules matching {pattern!r} have their own scale, but vLLM scales every module by lora_alpha / r; "
                "merge it into the base, or train without rank_pattern / alpha_pattern"
            )
    top = max(ranks)
    if top > VLLM_RANKS[-1]:
        verdict.reasons.append(f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif top > 16:
        flag = next(r for r in VLLM_RANKS if r >= top)
        verdict.notes.append(f"rank {top} > 16: start vLLM with --max-lora-rank {flag}")


def _tensors(weights: dict[str, Tensor], verdict: VllmVerdict) -> None:
    others = sorted(k for k in weights if not k.endswith(_FACTOR_SUFFIXES))
    if others:
        shown = ", ".join(others[:3]) + (f" (and {len(others) - 3} more)" if len(others) > 3 else "")
        verdict.reasons.append(f"the file holds tensors that are not LoRA factors ({shown}), which vLLM cannot load")
    if any(k.endswith((".lora_embedding_A", ".lora_embedding_B")) for k in weights):
        verdict.notes.append("LoRA on embeddings: vLLM serves it only for models whose vLLM code supports it")


def describe(verdict: VllmVerdict) -> str:
    """One line for `lorakit info`."""
    if verdict.servable:
        extra = f" ({'; '.join(verdict.notes)})" if verdict.notes else ""
        return f"vLLM: servable with vllm serve BASE --enable-lora --lora-modules NAME=PATH{extra}"
    return "vLLM: not servable: " + "; ".join(verdict.reasons)
