"""Each live adapter's factors as views of one buffer, for compiled unrouted inference steps.

A compiled step takes every adapted layer's factors as graph inputs: two tensors a layer, each with its guards and
its place among the CUDA graph's inputs, which cost a one-adapter decode step more host time than its LoRA math
(benchmarks/README.md, "One adapter's factors in one buffer"). With the factors moved into one buffer, the step
takes that buffer once (from BUFFERS, one place for every layer) and each layer a view of it at its own offset
(`LoraLayer._fast`, in the layer's plan: lorakit.plans).

Made where it helps: once a compiled unrouted inference step has run (`AdapterState.pack_wanted`), as the
LoraModel's next unrouted call starts without gradients. The factors then live in the buffer (their own storage
released), so whatever changes them in place (optimizer steps, copy_, hot swaps) is what the step reads; any other
change (an adapter set, added, deleted, merged, rescaled or moved; a factor replaced) takes the offsets away at
once (lorakit.state.packs_stale) until the next such call makes them again. Not seen, as by the gathered tables:
a factor's `.data` assigned by hand. The factors of one adapter then share a storage as views that do not overlap,
which safetensors and torch.save store as they are. Not made for a model FSDP2 shards: its factors' storage is FSDP's.

Siblings: projections of one parent that a model calls with the same input (q, k and v; gate and up: SIBLINGS)
form a group (GROUPS), and in a compiled decode step the first of them to be called computes all their outputs
in one launch (ops.lora_linear_group), the others taking theirs from STASH. That the input is the same is checked
as the step is traced (the tensor itself); where it is not (a cross-attention's q and k), the group is found broken
(BROKEN) and the next pack leaves those layers apart.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lorakit import plans
from lorakit.ops.gathered import whole
from lorakit.state import STALE_HOOKS, AdapterState, packs_fresh, tables_stale

PACK_DEVICES = ("cuda",)  # where a compiled step's host time is what the buffer saves (tests add "cpu")
ALIGN = 64  # elements: every view starts 16-byte aligned, so kernels keep their vector loads
BUFFERS: dict[int, Tensor] = {}  # number -> buffer, read by the compiled graphs (one source for all layers)
_NUMBERS = itertools.count()
_GROUP_NUMBERS = itertools.count()
SIBLINGS = tuple(
    frozenset(names)
    for names in (
        ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, OPT, BART, Whisper
        ("gate_proj", "up_proj"),  # the gated MLPs of the same
        ("query", "key", "value"),  # BERT and its kin
        ("q", "k", "v"),  # T5
        ("wi_0", "wi_1"),  # T5's gated MLP
        ("w1", "w3"),  # Mixtral's experts, the original Llama's MLP
    )
)
GROUPS: dict[int, tuple] = {}  # group number -> (its members' base layers, their dropout modules or None where none
# has dropout), read by compiled graphs (one source for every member); their offsets are in each member's _fast
BROKEN: set[int] = set()  # groups whose members a trace saw called with other inputs: packed apart next time


def group_number() -> int:
    """A new group's number, unique among the packed groups and lorakit.layer's gathered ones (the stash and
    BROKEN name both kinds by it)."""
    return next(_GROUP_NUMBERS)


def sibling_kin(leaf: str) -> int | None:
    """Which name set of SIBLINGS a module's own name is in, if any."""
    return next((i for i, names in enumerate(SIBLINGS) if leaf in names), None)


class _Stash:
    """The outputs a group's first member computed for the others: (group, input, outputs, None where taken)."""

    def __init__(self) -> None:
        self.pending: tuple | None = None  # in the instance from the start: a trace that sets it changes no guard


STASH = _Stash()
_HELD: weakref.WeakKeyDictionary[AdapterState, dict] = weakref.WeakKeyDictionary()  # state -> its buffers, layers


def prepare(state: AdapterState, layers: Callable[[], Iterable]) -> None:
    """As an unrouted call of the model starts: the layers' offsets made again where a compiled step wants them."""
    if STASH.pending is not None:  # a group's outputs the last step left untaken: its members do not go together
        BROKEN.add(STASH.pending[0])
        STASH.pending = None
    if not state.pack_wanted or not state.enabled or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    fresh = state.pack_fresh and state.pack_owner == id(state) and state.pack_active == tuple(state.active)
    if fresh and not (BROKEN and BROKEN & _held(state)["groups"].keys()):
        return
    if not any(d != "cuda" or torch.cuda.is_available() for d in PACK_DEVICES):
        return
    _build(state, layers())


def _build(state: AdapterState, layers: Iterable[tuple[str, object]]) -> None:
    """Every layer whose forward is one plain LoRA adapter on a linear weight gets its offsets; others None. An
    adapter's factors already in its buffer stay there (same number: the compiled graph is kept, and switching
    back to an adapter compiles nothing); otherwise they move into a new one."""
    from lorakit.layer import _plain_factors

    held = _held(state)
    groups: dict[tuple, list] = {}  # (adapter name, dtype, device) -> its layers and factors
    named = []
    for path, layer in layers:
        plans.set_plan(layer, fast=None)
        if layer.acts_on_weight or layer.merged_adapters:
            continue
        names = state.live(list(layer.adapters._modules))
        factors = _plain_factors(layer.adapters._modules[names[0]]) if len(names) == 1 else None
        if factors is None:
            continue
        a, b = factors.lora_A, factors.lora_B
        if a.dim() != 2 or b.dim() != 2 or (a.dtype, a.device) != (b.dtype, b.device):
            continue
        if a.device.type in PACK_DEVICES:
            groups.setdefault((names[0], a.dtype, a.device), []).append((layer, a, b, factors.scale, factors.dropout))
            named.append((path, layer, layer.adapters._modules[names[0]]._modules.get("dropout")))
    if any(not whole(t) for members in groups.values() for _, a, b, _, _ in members for t in (a, b)):
        groups, named = {}, []  # FSDP2 shards the model: its storage is FSDP's (see layer._sharded)
    numbers, layers_now = held["numbers"], weakref.WeakSet()
    for key, members in groups.items():
        # every A before every B, in the layers' order: siblings' A side by side, one tensor for a shrink of them all
        factors = [a for _, a, _, _, _ in members] + [b for _, _, b, _, _ in members]
        number = numbers.get(key)
        if number is None or not _inside(factors, BUFFERS[number]):
            BUFFERS.pop(number, None)
            tables_stale()  # the factors move: the gathered tables hold their old addresses
            number = numbers[key] = _move(factors)
        for layer, a, b, scale, dropout in members:
            plans.set_plan(layer, fast=(number, _span(a), _span(b), scale, dropout, None))
            layers_now.add(layer)
    for key in [k for k in numbers if k[0] not in state.parents]:  # deleted adapters: their buffers go with them
        BUFFERS.pop(numbers.pop(key), None)
    _group(held, named)
    held["layers"] = layers_now
    state.pack_owner, state.pack_active = id(state), tuple(state.active)
    packs_fresh(state)


def _group(held: dict, named: list[tuple[str, object, object]]) -> None:
    """Siblings with offsets in one buffer, of one input size, become a group: each member's offsets name it and
    its place in it. A group's number is kept while its members and buffer are (switching back to an adapter
    compiles nothing)."""
    for number in held["groups"]:
        GROUPS.pop(number, None)
    for number in BROKEN & held["groups"].keys():
        held["apart"].add(held["groups"][number])
        BROKEN.discard(number)
    held["groups"] = {}
    buffers = set(held["numbers"].values())  # a deleted adapter's groups are not kept for a switch back
    held["ids"] = {key: number for key, number in held["ids"].items() if key[1] in buffers}
    by_parent: dict[tuple, list] = {}
    for path, layer, dropout in named:
        parent, _, leaf = path.rpartition(".")
        fast = plans.of(layer).fast
        kin = sibling_kin(leaf)
        if kin is not None:
            by_parent.setdefault((parent, kin, fast[0], fast[1][2]), []).append((path, layer, dropout))
    for members in by_parent.values():
        paths = tuple(path for path, _, _ in members)
        if not 2 <= len(members) <= 3 or paths in held["apart"]:
            continue
        key = (paths, plans.of(members[0][1]).fast[0])
        number = held["ids"].get(key)
        if number is None:
            number = held["ids"][key] = group_number()
        fasts = [plans.of(layer).fast for _, layer, _ in members]
        dropouts = tuple(dropout if fast[4] else None for (_, _, dropout), fast in zip(members, fasts, strict=True))
        bases = tuple(layer._modules["base_layer"] for _, layer, _ in members)
        GROUPS[number] = (bases, None if all(d is None for d in dropouts) else dropouts)
        held["groups"][number] = paths
        spans = tuple(fast[:4] for fast in fasts)  # in every member's offsets: constants, one guard for all
        for index, (_, layer, _) in enumerate(members):
            plans.set_plan(layer, fast=(*plans.of(layer).fast[:5], (number, index, spans)))


def _held(state: AdapterState) -> dict:
    """The state's buffers and groups and the layers given offsets; a deep copy's own (its factors are not in
    them). "apart": the member paths of groups found broken; "ids": group numbers by members and buffer."""
    held = _HELD.get(state)
    if held is None:
        held = _HELD[state] = {"numbers": {}, "layers": weakref.WeakSet(), "groups": {}, "apart": set(), "ids": {}}
        weakref.finalize(state, _release, held)
    return held


def _release(held: dict) -> None:
    for number in held["numbers"].values():
        BUFFERS.pop(number, None)
    for number in held["groups"]:
        GROUPS.pop(number, None)


def _inside(factors: list[Tensor], buffer: Tensor) -> bool:
    storage = buffer.untyped_storage().data_ptr()
    return all(
        t.untyped_storage().data_ptr() == storage and t.is_contiguous() and t.dtype == buffer.dtype for t in factors
    )


def _move(factors: list[Tensor]) -> int:
    """The factors' values copied into a new buffer and the factors made views of it (their storage released)."""
    first = factors[0]
    size = sum(_padded(t.numel()) for t in factors)
    buffer = torch.empty(size, dtype=first.dtype, device=first.device)
    torch._dynamo.mark_static_address(buffer)  # CUDA graphs read it where it is, never a copy a step
    offset = 0
    with torch.no_grad():
        for t in factors:
            view = buffer[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            t.data = view
            offset += _padded(t.numel())
    number = next(_NUMBERS)
    BUFFERS[number] = buffer
    return number


def _span(t: Tensor) -> tuple[int, int, int]:
    return (t.storage_offset(), *t.shape)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _drop(state: AdapterState) -> None:
    """packs_stale's hook: the layers lose their offsets (the buffers stay, holding the factors)."""
    held = _HELD.get(state)
    if held is not None:
        for layer in list(held["layers"]):
            plans.set_plan(layer, fast=None)
        held["layers"] = weakref.WeakSet()
        for number in held["groups"]:  # kept in held: a broken one is still found at the next pack
            GROUPS.pop(number, None)  # the base layers they hold go with them


STALE_HOOKS.append(_drop)
