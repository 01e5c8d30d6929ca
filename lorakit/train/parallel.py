"""Several processes (torchrun) training one adapter: DDP replicates the model, FSDP2 shards it.

DDP keeps a whole copy of the model on every rank and averages gradients; FSDP2 (torch's `fully_shard`) splits
every parameter across ranks and gathers one block at a time, for models that do not fit one card. Blocks are
the model's repeated layers (transformers' `_no_split_modules`, or the items of its ModuleLists). The frozen base
and the trainable adapters live in the same blocks; only the adapters get gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

MODES = ("ddp", "fsdp")


def wrap(model: nn.Module, mode: str, world: int, device: torch.device) -> nn.Module:
    """The module the loop calls: `model` itself in one process, else its DDP or FSDP2 form."""
    if world == 1:
        return model.to(device)
    if mode == "ddp":
        model.to(device)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # what is left: embeddings, head, modules_to_save copies
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers each sharded on their own, so only one of them is gathered at a time."""
    names = set(getattr(_base(model), "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    return [item for m in model.modules() if isinstance(m, nn.ModuleList) for item in m]


def no_sync(wrapped: nn.Module, sync: bool) -> Any:
    """Gradients are averaged over ranks at the last micro-batch of an accumulation only."""
    if sync:
        return nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return _fsdp_no_sync(wrapped) if _is_fsdp(wrapped) else nullcontext()


@contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)  # a LoraModel keeps the user's model as .model


def compile_blocks(model: nn.Module, mode: str, backend: str, device: torch.device) -> bool:
    """torch.compile on each repeated block (the base's decoder layers), in place, when `mode` asks for it ("auto":
    on a GPU, where it pays; a CPU run would spend longer compiling than it saves). Blocks, not the whole model:
    one compiled block serves every layer, so compiling takes seconds, and the model's modules, state dict and
    adapter files stay as they are. True when compiled."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    targets = blocks(model) or [_base(model)]
    for block in targets:
        block.compile(backend=backend)
    return True
