"""Several processes (torchrun) training one adapter: DDP replicates the model, FSDP2 shards it.

DDP keeps a whole copy of the model on every rank and averages gradients; FSDP2 (torch's `fully_shard`) splits
every parameter across ranks and gathers one block at a time, for models that do not fit one card. Blocks are
the model's repeated layers (transformers' `_no_split_modules`, or the items of its ModuleLists). The frozen base
and the trainable adapters live in the same blocks; only the adapters get gradients.
"""

from __future__ import annotations

import warnings
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


class Compiled:
    """What compile_blocks did: whether the blocks are compiled, and whether any of them fell back to eager."""

    def __init__(self, requested: bool) -> None:
        self.requested, self.fell_back = requested, False

    def __bool__(self) -> bool:
        return self.requested and not self.fell_back


def compile_blocks(model: nn.Module, mode: str, backend: str, device: torch.device) -> Compiled:
    """torch.compile on each repeated block (the base's decoder layers), in place, when `mode` asks for it ("auto":
    on a GPU, where it pays; a CPU run would spend longer compiling than it saves). Blocks, not the whole model:
    one compiled block serves every layer, so compiling takes seconds, and the model's modules, state dict and
    adapter files stay as they are. Under "auto" a block the backend fails to compile runs eagerly, with a
    warning: a default that speeds runs up must not stop one; "on" lets the error through."""
    state = Compiled(mode == "on" or (mode == "auto" and _compiling_pays(device)))
    if not state.requested:
        return state
    compiler = _or_eager(backend, state) if mode == "auto" else backend
    for block in blocks(model) or [_base(model)]:
        block.compile(backend=compiler)
    return state


def _compiling_pays(device: torch.device) -> bool:
    return device.type == "cuda"


def _or_eager(backend: str, state: Compiled) -> Any:
    """`backend`, except that a graph it fails on is run as traced (eagerly) and the run goes on."""
    compile_graph = torch._dynamo.lookup_backend(backend)

    def compile_or_eager(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        try:
            return compile_graph(graph, example_inputs)
        except Exception as err:  # any backend failure: the eager graph computes the same thing
            if not state.fell_back:
                warnings.warn(
                    f"torch.compile ({backend}) failed on the model's layers ({type(err).__name__}: "
                    f"{str(err)[:200]}); they run eagerly. Set run.compile=off to skip compiling, or =on to see the "
                    "error",
                    stacklevel=2,
                )
            state.fell_back = True
            return graph.forward

    return compile_or_eager
