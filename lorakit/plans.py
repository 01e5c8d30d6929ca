"""What a compiled step is specialised on in each adapted layer, as one guarded number a layer.

A traced layer decides its path from a few small values: where lorakit.packed put its adapter (`fast`), its
gathered table (`table`: where the table's entries are, its sizes and tiles), the siblings it is launched with
(`group`) and the state it reads them through (`token`). Read as attributes, every one of them is a guard that
the compiled step checks at every call, for every layer: a routed decode step of 8 Llama layers checked about 800
of them (benchmarks/compiled_host_cpu.py). Here they are one Plan, interned: a layer holds its plan's number, the
traced code reads that number (one guard) and gets the plan itself from `plan`, whose result the compiler takes as
a constant of the graph. A number is never given to another plan, so a step guarded on it is right as long as the
number is the layer's; a change makes a new number, or finds the old one of an equal plan (switching back compiles
nothing). The number must be a constant to the compiler, as integer attributes of modules are by default: with
dynamo's allow_unspec_int_on_nn_module on, each adapted layer breaks the graph there.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, NamedTuple

import torch


class Plan(NamedTuple):
    """A layer's constants for a compiled step (lorakit.layer reads them; lorakit.packed and the gathered tables
    set them)."""

    fast: tuple | None = None  # lorakit.packed's offsets of the live adapter, see layer._packed_linear
    group: tuple | None = None  # (key, index, the members' table refs): siblings in one gathered launch
    token: int | None = None  # the state's key in state.GATHERING while the table is current
    table: Any = None  # ops.gathered.TableRef of the layer's table, or None
    no_dropout: bool = False  # no adapter of the table draws a dropout mask: the gathered path reads no training flag


EMPTY = 0
_PLANS: dict[int, Plan] = {EMPTY: Plan()}
_NUMBERS: dict[Plan, int] = {Plan(): EMPTY}
_COUNT = itertools.count(EMPTY + 1)
_HOLDERS: weakref.WeakSet = weakref.WeakSet()  # layers holding a plan other than the empty one
KEPT = 4096  # plans kept beyond those held: old ones, for a switch back that compiles nothing


@torch.compiler.assume_constant_result
def plan(number: int) -> Plan:
    """The plan of that number. Traced, its result is a constant of the graph: no guard on what it holds, which
    the number already stands for."""
    return _PLANS[number]


def of(layer: torch.nn.Module) -> Plan:
    return _PLANS[layer.__dict__["_plan"]]


def set_plan(layer: torch.nn.Module, **changes: object) -> None:
    """The layer's plan with `changes` (Plan's fields), under its interned number."""
    new = of(layer)._replace(**changes)
    number = _NUMBERS.get(new)
    if number is None:
        if len(_PLANS) > KEPT + len(_HOLDERS):
            _forget()
        number = _NUMBERS[new] = next(_COUNT)
        _PLANS[number] = new
    layer.__dict__["_plan"] = number
    if number != EMPTY:
        _HOLDERS.add(layer)


def _forget() -> None:
    """Drops the plans no layer holds. Their numbers are not given again, so a step compiled for one of them fails
    its guard rather than read another plan."""
    held = {layer.__dict__["_plan"] for layer in list(_HOLDERS)} | {EMPTY}
    for number in [n for n in _PLANS if n not in held]:
        del _NUMBERS[_PLANS.pop(number)]
