"""What LoRA can adapt in a model, asked of the library itself (kinds, targets), so `lorakit inspect` and training
always agree: each adaptable module with its kind and shape, and the target_modules to start from."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetError
from lorakit.kinds import kind_of
from lorakit.targets import default_targets, find_module_targets, logical_modules


@dataclass
class Adaptable:
    """One module LoRA can wrap."""

    path: str
    kind: str
    shape: str  # "in->out", plus the kernel for convolutions
    params: int
    in_all_linear: bool  # selected by target_modules="all-linear"
    plain_matmul: bool  # a linear layer however stored: one outside all-linear is the output head


def adaptable_modules(model: nn.Module) -> list[Adaptable]:
    """Every module of `model` that LoRA can adapt, in module order."""
    all_linear = _all_linear_paths(model)
    found = []
    for path, module in logical_modules(model):
        kind = kind_of(module)
        if kind is None:
            continue
        in_f, out_f = kind.in_out(kind.weight_of(module))
        kernel = tuple(getattr(module, "kernel_size", ()))
        shape = f"{in_f}->{out_f}" + (f" k{'x'.join(map(str, kernel))}" if kernel else "")
        params = sum(p.numel() for p in module.parameters())
        found.append(Adaptable(path, kind.name, shape, params, path in all_linear, kind.is_plain_matmul))
    return found


def default_target_modules(model: nn.Module) -> list[str] | str | None:
    """The per-architecture default target_modules (what LoraConfig uses when left out: names, or a regex for some
    architectures), or None if unknown."""
    try:
        return default_targets(model)
    except TargetError:
        return None


def matched_modules(model: nn.Module, target_modules: list[str] | str) -> int:
    """How many modules `target_modules` selects, by the rules training uses (names or a full-match regex)."""
    try:
        return len(find_module_targets(model, LoraConfig(target_modules=target_modules)))
    except TargetError:
        return 0


def _all_linear_paths(model: nn.Module) -> set[str]:
    try:
        return {path for path, _ in find_module_targets(model, LoraConfig(target_modules="all-linear"))}
    except TargetError:
        return set()
