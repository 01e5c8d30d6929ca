"""add_gathered_lora: the routed terms of a decode step, each row's adapters read where they are.

    out[t] += sum_{p : g = slots[t, p] >= 0} s_g * B_g (A_g x[t])          (reference.add_gathered_lora)

A row names its adapters by number (the model's order of adapters; a tree path names several, -1 none), and a
layer's GatherTable holds, per number, where that adapter's factors are (their addresses on the device), its rank
and its scale. The CUDA kernels (ops/triton/gathered.py) read the factors through the table, so a compiled model's
CUDA graph replays them with the factors of the moment: nothing is copied or checked per layer and step, and the
host does nothing for the routed layers at all. The table is built (or refilled in place) by the layer when its
adapters change (lorakit.layer), never inside a step; it keeps the factors' storages alive, so an address in it
never outlives what it points to.
"""

from __future__ import annotations

import itertools
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the kernels' factor dtypes, by their code
MAX_RANK = 128  # above this, the kernels' rank-wide tiles would spill registers: such layers keep the other paths
MAX_TOKENS = 256  # token rows a step may have: each reads its adapters' factors whole, right for decode steps only
VECTOR_LOADS = True  # aligned tables load 16 bytes at a time (benchmarks/decode_step_gpu.py turns it off to compare)
BESIDE = True  # a CUDA graph makes the terms beside the base products (benchmarks/decode_step_gpu.py: off to compare)
STACKED = True  # the tables of a model share one tensor (restack; the benchmarks: off to compare)


STACKS: dict[int, Tensor] = {}  # home -> the entries of the tables that share it (GatherTable.home)
FACTORS: dict[int, list] = {}  # home -> by row, the factors its tables point at (the reference reads them)
_HOMES = itertools.count()


class TableRef(NamedTuple):
    """A table as a compiled step reaches it: through its home and row, and the sizes and tiles the kernels are
    specialised on. Plain constants (lorakit.plans), so a step guards none of them; what changes in place, the
    entries, is read from STACKS (entries_of), one input for all the tables of a stack."""

    home: int
    row: int
    n_in: int
    n_out: int
    block_r: int
    code: int
    aligned: bool


def entries_of(table: TableRef | GatherTable) -> Tensor:
    return STACKS[table.home][table.row]


def factors_of(table: TableRef | GatherTable) -> list[LoraFactors | None]:
    """The table's adapters by number, for the reference."""
    return FACTORS[table.home][table.row]


@dataclass(eq=False)
class GatherTable:
    """A layer's adapters by number: `entries` (G x 4, int64 on the device: A's address, B's address, rank, the
    scale's float64 bits; zeros where the layer holds no such adapter), and what the kernels are specialised on.
    The entries are row `row` of STACKS[home], a tensor the tables of one model's layers share (restack): a compiled
    step reaches it for every layer through that one place, so its graph takes one tensor for all the routed
    layers, not one each, and the host gathers and checks one input."""

    home: int
    dtype: torch.dtype
    n_in: int
    n_out: int
    block_r: int  # the widest rank, rounded up to a power of two (at least 16)
    storages: list[Tensor]  # aliases of the factors the entries point into: a `.data` assigned cannot free them
    aligned: bool = False  # every factor's address and row 16-byte aligned: the kernels load 16 bytes at a time
    row: int = 0
    keeper: object = None  # STACKS[home] lives while a table holding this does

    @property
    def entries(self) -> Tensor:
        return entries_of(self)

    @property
    def factors(self) -> list[LoraFactors | None]:
        return factors_of(self)

    @property
    def code(self) -> int:
        return DTYPES.index(self.dtype)

    @property
    def ref(self) -> TableRef:
        return TableRef(self.home, self.row, self.n_in, self.n_out, self.block_r, self.code, self.aligned)

    @property
    def form(self) -> tuple:
        """What a compiled graph is specialised on besides the addresses: tables alike here can be refilled."""
        return (self.entries.shape, self.entries.device, self.dtype, self.n_in, self.n_out, self.block_r, self.aligned)


def _homed(stack: Tensor, factors: list[list]) -> tuple[int, object]:
    """A home in STACKS for `stack` (and in FACTORS for its rows' factors), and the keeper whose end frees it."""
    home, keeper = next(_HOMES), _Keeper()
    torch._dynamo.mark_static_address(stack)  # CUDA graphs read it in place; refills keep its address
    STACKS[home], FACTORS[home] = stack, factors
    weakref.finalize(keeper, _free, home)
    return home, keeper


def _free(home: int) -> None:
    STACKS.pop(home, None)
    FACTORS.pop(home, None)


class _Keeper:
    """What the tables of one stack hold (a plain object() takes no weak reference)."""


def whole(t: Tensor) -> bool:
    """Whether `t`'s storage is the matrix it shows: an ordinary tensor, not a subclass such as FSDP2's sharded
    DTensor, whose storage holds one rank's shard (its address read as the whole matrix's would be wrong)."""
    return type(t) in (Tensor, torch.nn.Parameter)


def gather_table(factors: Sequence[LoraFactors | None]) -> GatherTable | None:
    """The table of `factors` (by number; None where absent), or None where the kernels do not apply: factors not
    whole (see `whole`) 2-D contiguous matrices of one dtype on one device, ranks above MAX_RANK, or no adapter."""
    held = [f for f in factors if f is not None]
    if not held:
        return None
    first = held[0]
    dtype, n_in, n_out = first.lora_A.dtype, first.lora_A.shape[-1], first.lora_B.shape[0]
    device = first.lora_A.device
    for f in held:
        a, b = f.lora_A, f.lora_B
        if not (whole(a) and whole(b) and a.dim() == b.dim() == 2 and a.is_contiguous() and b.is_contiguous()):
            return None
        if a.dtype != dtype or b.dtype != dtype or a.device != device or b.device != device or dtype not in DTYPES:
            return None
        rank = a.shape[0]
        if not 0 < rank <= MAX_RANK or a.shape[1] != n_in or b.shape != (n_out, rank):
            return None
    block_r = max(16, 1 << (max(f.lora_A.shape[0] for f in held) - 1).bit_length())
    with torch.inference_mode(False):
        entries = torch.tensor(_rows(factors), dtype=torch.int64).to(device)
        storages = [t.detach() for f in held for t in (f.lora_A, f.lora_B)]
    aligned = VECTOR_LOADS and all(_aligned(f) for f in held)
    home, keeper = _homed(entries[None], [list(factors)])
    return GatherTable(home, dtype, n_in, n_out, block_r, storages, aligned, keeper=keeper)


def _aligned(f: LoraFactors) -> bool:
    size = f.lora_A.element_size()
    rows = (f.lora_A.shape[1] * size, f.lora_B.shape[1] * size)  # A's rows are `in` wide, B's `rank`
    return all(t.data_ptr() % 16 == 0 for t in (f.lora_A, f.lora_B)) and all(r % 16 == 0 for r in rows)


def refill(table: GatherTable, fresh: GatherTable) -> GatherTable:
    """`fresh` written into `table`'s own entries where both are specialised alike (a compiled graph keeps reading
    the same address, so nothing recompiles or records again), else `fresh` itself."""
    if table.form != fresh.form:
        return fresh
    with torch.inference_mode(False), torch.no_grad():
        table.entries.copy_(fresh.entries)
    FACTORS[table.home][table.row], table.storages = fresh.factors, fresh.storages
    return table


def restack(old: Sequence[GatherTable | None], fresh: Sequence[GatherTable | None]) -> list[GatherTable | None]:
    """The tables of one model's layers (`fresh`, by layer; None where a layer has none) sharing one stack. Where
    every layer's old table is alike its fresh one and they already share a stack, the fresh entries are written
    into it and the old tables kept (a compiled graph reads the same address: nothing recompiles or records
    again); else the fresh tables get a stack of their own. Tables on several devices stay apart, each refilled
    into its old one where alike."""
    held = [t for t in fresh if t is not None]
    if STACKED and held and len({t.entries.device for t in held}) == 1:
        kept = [t for t in old if t is not None]
        shared = kept and all(t.home == kept[0].home and t.row == i for i, t in enumerate(kept))
        shared = shared and STACKS[kept[0].home].shape[0] == len(kept)
        if shared and all(
            (o is None) == (f is None) and (f is None or o.form == f.form) for o, f in zip(old, fresh, strict=True)
        ):
            for o, f in zip(kept, held, strict=True):
                refill(o, f)
            return list(old)
        with torch.inference_mode(False):
            home, keeper = _homed(torch.stack([t.entries for t in held]), [t.factors for t in held])
        for row, table in enumerate(held):
            table.home, table.row, table.keeper = home, row, keeper
        return list(fresh)
    return [f if o is None or f is None else refill(o, f) for o, f in zip(old, fresh, strict=True)]


def _rows(factors: Sequence[LoraFactors | None]) -> list[list[int]]:
    rows = []
    for f in factors:
        if f is None:
            rows.append([0, 0, 0, 0])
        else:
            scale_bits = struct.unpack("<q", struct.pack("<d", float(f.scale)))[0]
            rows.append([f.lora_A.data_ptr(), f.lora_B.data_ptr(), f.lora_A.shape[0], scale_bits])
    return rows


def add_gathered_lora(out: Tensor, x: Tensor, slots: Tensor, table: GatherTable) -> Tensor:
    """reference.add_gathered_lora over the table's adapters: x (T x in), out (T x out), slots (T x P)."""
    return reference.add_gathered_lora(out, x, slots, factors_of(table))


def add_gathered_lora_group(x: Tensor, outs: Sequence[Tensor], slots: Tensor, tables: Sequence[GatherTable]) -> list:
    """reference.add_gathered_lora_group over the tables' adapters: one table and output a sibling."""
    return reference.add_gathered_lora_group(x, outs, slots, [factors_of(t) for t in tables])


def gathered_linear_group(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], slots: Tensor,
    tables: Sequence[GatherTable],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """reference.gathered_linear_group over the tables' adapters: one table, weight and bias a sibling."""
    return reference.gathered_linear_group(x, weights, biases, slots, [factors_of(t) for t in tables])
