"""Several processes (torchrun) training one adapter: data parallel replicates the model, FSDP2 shards it.

"ddp" keeps a whole copy of the model on every rank and averages the gradients over ranks once the backward of an
optimizer step's last micro-batch is done: every gradient in one flat all-reduce. An adapter's gradients are a few
MB, so overlapping their reduction with the backward, as torch's DistributedDataParallel does through per-parameter
hooks and buckets, costs more than it hides: on two GPUs that wrapper added 6 ms to a 122 ms step where the one
all-reduce adds under 1 (benchmarks/ddp_step_gpu.py). FSDP2 (torch's `fully_shard`) splits every parameter across
ranks and gathers one block at a time, for models that do not fit one card. Blocks are the model's repeated layers
(transformers' `_no_split_modules`, or the items of its ModuleLists). The frozen base and the trainable adapters
live in the same blocks; only the adapters get gradients.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp")


def wrap(model: nn.Module, mode: str, world: int, device: torch.device) -> nn.Module:
    """The module the loop calls: `model` itself in one process and under ddp (rank 0's weights on every rank), else
    its FSDP2 form."""
    if world == 1:
        return model.to(device)
    if mode == "ddp":
        model.to(device)
        _broadcast_from_first(model)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # what is left: embeddings, head, modules_to_save copies
    return model


def meshes(wrapped: nn.Module) -> list[Any]:
    """The device meshes FSDP2 sharded `wrapped` over (none under ddp or in one process)."""
    from torch.distributed.tensor import DTensor

    found = {id(p.device_mesh): p.device_mesh for p in wrapped.parameters() if isinstance(p, DTensor)}
    return list(found.values())


def end(sharded_over: list[Any]) -> None:
    """Ends the process group and joins its worker threads while the interpreter still runs; call it once the model
    is dropped. A gloo worker frees each finished collective's tensors, which takes the GIL, and a worker that
    still does so when the interpreter shuts down aborts the process (SIGABRT) after a run that succeeded. The group
    lives as long as anything holds it: FSDP2's modules do (hence the collection, as they sit in reference cycles),
    and so does each device mesh, which torch's DTensor caches keep past `destroy_process_group`: `sharded_over`
    (from `meshes`) let go of it."""
    gc.collect()
    dist.destroy_process_group()
    for mesh in sharded_over:
        getattr(mesh, "_pg_registry", {}).clear()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers each sharded on their own, so only one of them is gathered at a time."""
    names = set(getattr(_base(model), "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    return [item for m in model.modules() if isinstance(m, nn.ModuleList) for item in m]


def _broadcast_from_first(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers, as DistributedDataParallel's constructor makes sure:
    the averaged gradients keep equal copies equal, not unequal ones."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def no_sync(wrapped: nn.Module, sync: bool) -> Any:
    """FSDP2 reduces gradients at the last micro-batch of an accumulation only (see average_gradients for ddp)."""
    if sync or not _is_fsdp(wrapped):
        return nullcontext()
    return _fsdp_no_sync(wrapped)


def average_gradients(wrapped: nn.Module, world: int) -> None:
    """ddp: every trainable parameter's gradient becomes its mean over the ranks, in one all-reduce per gradient
    dtype, once the backward of an optimizer step's last micro-batch is done. A gradient missing on some rank counts
    as zeros there (it gets the mean); one missing on every rank stays missing, so the optimizer skips it as it would
    in one process. Nothing to do in one process or under FSDP2, which reduces its own."""
    if world == 1 or _is_fsdp(wrapped):
        return
    params = [p for p in wrapped.parameters() if p.requires_grad]
    for dtype in dict.fromkeys(p.dtype for p in params):  # the same order on every rank
        group = [p for p in params if p.dtype == dtype]
        present = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=group[0].device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group]
        flat = torch.cat([*(g.reshape(-1) for g in grads), present])  # one message: the gradients, then who had one
        dist.all_reduce(flat)
        flat /= world
        had = flat[-len(group) :].tolist()  # one small read: the share of ranks that had each gradient
        means = flat[: -len(group)].split([p.numel() for p in group])
        for p, mean, share in zip(group, means, had, strict=True):
            if share > 0:
                p.grad = mean.view_as(p)


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
    """What compile_blocks did: whether the blocks are compiled, whether any of them fell back to eager, and whether
    they replay as CUDA graphs (then the loop must mark each step and own the gradients: see graph_safe_gradients)."""

    def __init__(self, requested: bool, graphs: bool = False) -> None:
        self.requested, self.fell_back, self.graphs = requested, False, requested and graphs

    def __bool__(self) -> bool:
        return self.requested and not self.fell_back


def compile_blocks(
    model: nn.Module, mode: str, backend: str, device: torch.device, compile_mode: str = "default"
) -> Compiled:
    """torch.compile on each repeated block (the base's decoder layers), in place, when `mode` asks for it ("auto":
    on a GPU, where it pays; a CPU run would spend longer compiling than it saves). Blocks, not the whole model:
    one compiled block serves every layer, so compiling takes seconds, and the model's modules, state dict and
    adapter files stay as they are. Under "auto" a block the backend fails to compile runs eagerly, with a
    warning: a default that speeds runs up must not stop one; "on" lets the error through. `compile_mode` is
    torch.compile's (inductor's options: "reduce-overhead" replays each block's kernels as a CUDA graph)."""
    options = _mode_options(compile_mode)
    graphs = replays_graphs(compile_mode) and device.type == "cuda"
    state = Compiled(mode == "on" or (mode == "auto" and _compiling_pays(device)), graphs)
    if not state.requested:
        return state
    if mode == "auto":  # the mode's options go through the wrapper, which torch.compile passes no mode
        how = {"backend": _or_eager(backend, state, options)}
    else:
        how = {"backend": backend, "mode": None if compile_mode == "default" else compile_mode}
    for block in blocks(model) or [_base(model)]:
        block.compile(**how)
    return state


def _mode_options(compile_mode: str) -> dict[str, Any]:
    """Inductor's settings behind a torch.compile mode ({} for the default)."""
    if compile_mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(compile_mode))


def replays_graphs(compile_mode: str) -> bool:
    """Whether torch.compile's `compile_mode` records CUDA graphs (on a GPU)."""
    return bool(_mode_options(compile_mode).get("triton.cudagraphs"))


def graph_safe_gradients(params: list[nn.Parameter], missing: list[bool]) -> None:
    """Gives each parameter whose gradient was missing before the backward (`missing`, in `params`' order) a copy of
    the one it got. Under CUDA graphs a backward's outputs live in the graphs' memory, which the next replay writes
    over; autograd hands such an output to a parameter with no gradient as its .grad, so the next micro-batch would
    add to, and the optimizer read, overwritten values. A gradient the parameter already owned was added to in place
    and stays: only the first micro-batch of a step copies (a few MB for an adapter)."""
    fresh = [p for p, was_missing in zip(params, missing, strict=True) if was_missing and p.grad is not None]
    if fresh:
        for p, owned in zip(fresh, torch._foreach_mul([p.grad for p in fresh], 1.0), strict=True):
            p.grad = owned


def _compiling_pays(device: torch.device) -> bool:
    return device.type == "cuda"


def _or_eager(backend: str, state: Compiled, options: dict[str, Any]) -> Any:
    """`backend` (given inductor's `options` where there are any), except that a graph it fails on is run as traced
    (eagerly) and the run goes on."""
    compile_graph = torch._dynamo.lookup_backend(backend)
    extra = {"config_patches": options} if options else {}

    def compile_or_eager(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        try:
            return compile_graph(graph, example_inputs, **extra)
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
