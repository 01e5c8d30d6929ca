"""Adapters held in RAM, and fixed-shape slots to switch them into without file I/O or recompiling.

    disk ──read once──► RAM        AdapterCache: config + tensors in one buffer per dtype (pinned on CUDA), LRU
    RAM  ──stage──────► device     up to `device_slots` adapters kept ready, padded to the slot's rank, s folded in B
    device ──copy─────► slot       the model adapter being served: fixed shapes, scale 1.0

A slot is an ordinary adapter of the model whose every layer has rank R and scale 1.0 (lora_alpha = r = R): an
adapter of rank r <= R and scale s fits as A' = [A; 0] (R x in) and B' = [s B, 0] (out x R), so
B'(A' x) = s B(A x). Switching copies tensors into the slot's parameters in place; no shape, attribute or Python
float changes, so a torch.compile'd model runs the new adapter without recompiling (PEFT's compiled hotswap idea).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit import io
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.inject import lora_layers, saved_modules

if TYPE_CHECKING:
    from lorakit.adapter import Adapter
    from lorakit.model import LoraModel

_SLOT_VARIANTS = ("lora", "lora_fa")  # a plain s B A term; other variants carry state a slot cannot swap


class CacheError(LorakitError):
    """An adapter cache that cannot hold what it is asked to, or an adapter that does not fit a slot."""


@dataclass(frozen=True)
class CachedAdapter:
    """One adapter folder as read from disk: its config and file tensors (CPU; pinned when CUDA is present)."""

    path: Path
    signature: tuple[tuple[str, int, int], ...]  # (file name, mtime_ns, size) per file: a change means reload
    config: LoraConfig
    weights: dict[str, Tensor]  # views of `buffers`, laid out in this order
    nbytes: int
    buffers: dict[torch.dtype, Tensor]  # every tensor of one dtype, back to back: one copy moves them to a device


class AdapterCache:
    """Adapter folders in RAM, least recently used evicted first, plus up to `device_slots` staged on the device.

    max_bytes / max_adapters: limits on what stays in RAM (None: no limit on that measure).
    device_slots: how many adapters are kept staged on the device for instant switching (0: stage on each switch).
    pin_memory: page-locked RAM for fast, asynchronous copies to the GPU; default: when CUDA is available.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        max_adapters: int | None = None,
        device_slots: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        for name, value, least in (("max_bytes", max_bytes, 1), ("max_adapters", max_adapters, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise CacheError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(device_slots, bool) or not isinstance(device_slots, int) or device_slots < 0:
            raise CacheError(f"device_slots must be an integer >= 0, got {device_slots!r}")
        self.max_bytes, self.max_adapters, self.device_slots = max_bytes, max_adapters, device_slots
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._entries: OrderedDict[Path, CachedAdapter] = OrderedDict()
        self._staged: OrderedDict[tuple, list[Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __deepcopy__(self, memo: dict) -> AdapterCache:
        return self  # a cache is a shared resource: a copied model uses the same one, not a second copy of RAM

    # -- RAM ------------------------------------------------------------------------------------------
    def get(self, directory: str | Path) -> CachedAdapter:
        """The adapter in `directory`, read from disk only if absent or its files changed since it was read.

        A cached adapter whose folder has since been removed is still served from RAM."""
        path = Path(directory).resolve()
        entry = self._entries.get(path)
        signature = _signature(path)
        if entry is not None and signature in (entry.signature, None):
            self._entries.move_to_end(path)
            self.hits += 1
            return entry
        entry = self._read(path)
        self._make_room(entry)
        self._drop(path)
        self._entries[path] = entry
        self.misses += 1
        return entry

    def read(self, directory: str | Path) -> tuple[LoraConfig, dict[str, Tensor]]:
        """(config, weights) as io.read_config / io.read_weights return them; the config is the caller's copy."""
        entry = self.get(directory)
        return dataclasses.replace(entry.config), entry.weights

    def __contains__(self, directory: str | Path) -> bool:
        return Path(directory).resolve() in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of adapter tensors held in RAM."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def resident(self) -> int:
        """How many adapters are staged on the device, ready to switch to."""
        return len(self._staged)

    def evict(self, directory: str | Path) -> None:
        """Forgets one adapter (RAM and device); the next use reads its folder again."""
        self._drop(Path(directory).resolve())

    def clear(self) -> None:
        self._entries.clear()
        self._staged.clear()

    def _read(self, path: Path) -> CachedAdapter:
        signature = _signature(path)
        if signature is None:
            raise AdapterFileError(f"adapter folder {path} does not exist or lacks {io.CONFIG_NAME}")
        config, weights = io.read_config(path), io.read_weights(path)
        buffers, weights = _pack(weights, self.pin_memory)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return CachedAdapter(path, signature, config, weights, nbytes, buffers)

    def _make_room(self, entry: CachedAdapter) -> None:
        """Evicts least recently used adapters until `entry` fits; refuses one that cannot fit at all."""
        if self.max_bytes is not None and entry.nbytes > self.max_bytes:
            raise CacheError(
                f"the adapter in {entry.path} takes {entry.nbytes:,} bytes, more than the cache's max_bytes="
                f"{self.max_bytes:,}; raise max_bytes or load it without the cache"
            )
        others = [e for p, e in self._entries.items() if p != entry.path]
        while others and (
            (self.max_bytes is not None and sum(e.nbytes for e in others) + entry.nbytes > self.max_bytes)
            or (self.max_adapters is not None and len(others) + 1 > self.max_adapters)
        ):
            self._drop(others.pop(0).path)

    def _drop(self, path: Path) -> None:
        self._entries.pop(path, None)
        for key in [k for k in self._staged if k[0] == path]:
            del self._staged[key]

    # -- device ---------------------------------------------------------------------------------------
    def staged(self, entry: CachedAdapter, slot: Slot) -> list[Tensor]:
        """`entry`'s tensors in `slot`'s layout on its device, kept for the `device_slots` most recent ones."""
        key = (entry.path, entry.signature, slot.layout)
        tensors = self._staged.get(key)
        if tensors is None:
            moved = {dtype: b.to(slot.device, non_blocking=True, copy=True) for dtype, b in entry.buffers.items()}
            tensors = slot.stage(_factors_from_file(slot, entry, _views(moved, entry.weights)), owned=True)
            if self.device_slots:
                self._staged[key] = tensors
                while len(self._staged) > self.device_slots:
                    self._staged.popitem(last=False)
        else:
            self._staged.move_to_end(key)
        return tensors


def _pack(weights: dict[str, Tensor], pin: bool) -> tuple[dict[torch.dtype, Tensor], dict[str, Tensor]]:
    """(one buffer per dtype, pinned if `pin`; the tensors as views of it): an adapter then moves to the GPU in one
    copy per dtype instead of one small copy per tensor (hundreds for an all-linear adapter)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    buffers = {dtype: torch.empty(n, dtype=dtype, pin_memory=pin) for dtype, n in sizes.items()}
    views = _views(buffers, weights)
    for key, view in views.items():
        view.copy_(weights[key])
    return buffers, views


def _views(buffers: dict[torch.dtype, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor of `like` as a view of its dtype's buffer, back to back in `like`'s order (as _pack lays them)."""
    offsets = dict.fromkeys(buffers, 0)
    views = {}
    for key, tensor in like.items():
        start = offsets[tensor.dtype]
        offsets[tensor.dtype] = start + tensor.numel()
        views[key] = buffers[tensor.dtype][start : start + tensor.numel()].view(tensor.shape)
    return views


def _signature(path: Path) -> tuple[tuple[str, int, int], ...] | None:
    """(name, mtime_ns, size) of the folder's adapter files; None when the folder or its config is gone."""
    out = []
    for name in (io.CONFIG_NAME, io.WEIGHTS_NAME):
        try:
            st = os.stat(path / name)
        except OSError:
            if name == io.CONFIG_NAME:
                return None
            continue  # io.read_weights explains a missing weights file
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


# -- slots ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Slot:
    """A model adapter in slot form (rank R, scale 1 everywhere), with its parameters in a fixed order. It holds its
    adapters weakly: a slot kept for a model must not keep an adapter deleted from it alive."""

    name: str
    rank: int
    config: LoraConfig
    paths: list[str]
    refs: list[weakref.ref[Adapter]]
    keys: dict[str, tuple[int, int]]  # file key -> (layer index, 0 for A / 1 for B)
    layout: tuple  # what staged tensors depend on: each factor's layer path, shape, dtype and device

    @property
    def adapters(self) -> list[Adapter | None]:
        return [ref() for ref in self.refs]

    @property
    def tensors(self) -> list[Tensor]:
        return [t for a in self.adapters for t in (a.lora_A, a.lora_B)]

    @property
    def device(self) -> torch.device:
        return self.layout[0][3]

    def is_current(self, model: LoraModel) -> bool:
        """Still the model's adapter: not deleted, re-added, reshaped or moved (.to()) since this slot was built."""
        adapters = self.adapters
        if any(a is None for a in adapters):  # deleted
            return False
        first = adapters[0].lora_A
        return (
            model.peft_config.get(self.name) is self.config
            and (first.dtype, first.device) == self.layout[0][2:]
            and all(a.r == self.rank and a.scale == 1.0 and a.lora_A.shape[0] == self.rank for a in adapters)
        )

    def stage(self, factors: dict[int, tuple[Tensor, Tensor, float]], owned: bool = False) -> list[Tensor]:
        """[A', B'] per layer: each layer's (A, B, s) padded to rank R with s folded into B; zeros where absent.

        owned: the factors are the caller's copies, which may be scaled in place and kept as the staged tensors."""
        if self._fits_as_is(factors):  # one multi-tensor op instead of a few small ones per layer
            ordered = [factors[i] for i in range(len(self.adapters))]
            Bs, scales = [B for _, B, _ in ordered], [s for _, _, s in ordered]
            if owned:
                torch._foreach_mul_(Bs, scales)
            else:
                Bs = list(torch._foreach_mul(Bs, scales))
            return [t for (A, _, _), B in zip(ordered, Bs, strict=True) for t in (A, B)]
        staged = []
        for i, adapter in enumerate(self.adapters):
            A, B = torch.zeros_like(adapter.lora_A), torch.zeros_like(adapter.lora_B)
            if i in factors:
                lora_A, lora_B, scale = factors[i]
                r = lora_A.shape[0]
                A[:r].copy_(lora_A, non_blocking=True)
                B[:, :r].copy_(lora_B.to(B.device, B.dtype, non_blocking=True) * scale)
            staged += [A, B]
        return staged

    def _fits_as_is(self, factors: dict[int, tuple[Tensor, Tensor, float]]) -> bool:
        """Every layer present at the slot's rank, dtype and device: nothing to pad, fill or convert."""
        if len(factors) != len(self.adapters):
            return False
        for i, (A, B, _) in factors.items():
            (_, a_shape, dtype, device), (_, b_shape, _, _) = self.layout[2 * i], self.layout[2 * i + 1]
            expected = (a_shape, b_shape, dtype, dtype, device, device)
            if (A.shape, B.shape, A.dtype, B.dtype, A.device, B.device) != expected:
                return False
        return True

    def load(self, staged: list[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, staged)


_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Slot]] = weakref.WeakKeyDictionary()


def prepare_slot(model: LoraModel, adapter_name: str, rank: int | None = None) -> Slot:
    """Puts adapter `adapter_name` into slot form of rank `rank` (default: its largest rank), outputs unchanged.

    Call it before torch.compile with the largest rank you will swap in (PEFT's prepare_model_for_compiled_hotswap);
    afterwards hotswap_adapter only copies. Already in slot form with that rank: nothing changes. Converting
    replaces the adapter's parameters with larger ones, so an optimizer made before holds the old ones."""
    slot = _SLOTS.get(model, {}).get(adapter_name)
    if slot is not None and slot.is_current(model) and rank in (None, slot.rank):
        return slot
    layers, rank = _slot_layers(model, adapter_name, rank)
    if any(a.lora_A.shape[0] != rank or a.scale != 1.0 for _, a in layers):
        for _, adapter in layers:
            _pad_in_place(adapter, rank)
        model.peft_config[adapter_name] = dataclasses.replace(
            model.peft_config[adapter_name], r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={},
            use_rslora=False,
        )  # fmt: skip
    slot = _build_slot(model, adapter_name, rank, layers)
    slots = _SLOTS.setdefault(model, {})
    for name in [n for n, s in slots.items() if not s.is_current(model)]:  # deleted or changed since: never reused
        del slots[name]
    slots[adapter_name] = slot
    return slot


def prepare_slots(model: LoraModel, adapter_names: list[str], rank: int | None = None) -> None:
    """prepare_slot for several adapters, every one checked before any changes: all converted, or none."""
    for name in adapter_names:
        _slot_layers(model, name, rank)
    for name in adapter_names:
        prepare_slot(model, name, rank)


def _slot_layers(model: LoraModel, adapter_name: str, rank: int | None) -> tuple[list, int]:
    """The adapter's (path, Adapter) pairs and the slot's rank, checked: plain LoRA, rank an integer >= its own."""
    _check_slot_adapter(model, adapter_name)
    layers = [
        (p, layer.adapters[adapter_name]) for p, layer in lora_layers(model.model) if adapter_name in layer.adapters
    ]
    largest = max(a.lora_A.shape[0] for _, a in layers)
    rank = largest if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < largest:
        raise CacheError(f"rank must be an integer >= {largest} (the adapter's largest rank), got {rank!r}")
    return layers, rank


def _check_slot_adapter(model: LoraModel, adapter_name: str) -> None:
    if adapter_name not in model.peft_config:
        raise CacheError(
            f"no adapter {adapter_name!r} to swap into; loaded: {sorted(model.peft_config)}. Load the first adapter "
            f"with load_adapter(path, {adapter_name!r}), then hotswap the others into it"
        )
    _check_plain(model, adapter_name, model.peft_config[adapter_name], what="slot")
    if any(adapter_name in layer.merged_adapters for _, layer in lora_layers(model.model)):
        raise CacheError(f"adapter {adapter_name!r} is merged into the weights; unmerge_adapter() before swapping")


def _check_plain(model: LoraModel | None, name: str, config, what: str) -> None:
    """Only plain LoRA (A, B, a scale) moves through a slot; everything else names why not."""
    problem = None
    if not isinstance(config, LoraConfig) or config.use_dora or config.variant not in _SLOT_VARIANTS:
        problem = "is not plain LoRA (DoRA / VeRA / Delta-LoRA carry tensors besides A and B)"
    elif config.target_parameters:
        problem = "uses target_parameters (its delta acts on a weight, not through A and B of a layer)"
    elif config.bias != "none" or config.modules_to_save:
        problem = "trains biases or whole modules (bias / modules_to_save), which a slot of A and B cannot hold"
    elif model is not None and any(name in s.copies for _, s in saved_modules(model.model)):
        problem = "trains whole modules (modules_to_save / a task head), which a slot of A and B cannot hold"
    if problem:
        raise CacheError(f"{what} adapter {name!r} {problem}; load it with load_adapter instead of swapping it")


def _pad_in_place(adapter: Adapter, rank: int) -> None:
    """A (r x in) -> [A; 0] (R x in), B (out x r) -> [s B, 0] (out x R), scale -> 1: the same s B A."""
    r = adapter.lora_A.shape[0]
    with torch.no_grad():
        A = adapter.lora_A.new_zeros(rank, *adapter.lora_A.shape[1:])
        B = adapter.lora_B.new_zeros(adapter.lora_B.shape[0], rank, *adapter.lora_B.shape[2:])
        A[:r] = adapter.lora_A
        B[:, :r] = adapter.lora_B * adapter.scale
    adapter.lora_A = nn.Parameter(A, requires_grad=adapter.lora_A.requires_grad)
    adapter.lora_B = nn.Parameter(B, requires_grad=adapter.lora_B.requires_grad)
    adapter.r, adapter.alpha, adapter.scale = rank, float(rank), 1.0


def _build_slot(model: LoraModel, adapter_name: str, rank: int, layers: list[tuple[str, Adapter]]) -> Slot:
    config = model.peft_config[adapter_name]
    position = {}
    for i, (_, adapter) in enumerate(layers):
        position[id(adapter.lora_A)], position[id(adapter.lora_B)] = (i, 0), (i, 1)
    keys = {k: position[id(t)] for k, t in io.adapter_tensors(model.model, adapter_name, config).items()}
    layout = tuple((p, tuple(t.shape), t.dtype, t.device) for p, a in layers for t in (a.lora_A, a.lora_B))
    return Slot(adapter_name, rank, config, [p for p, _ in layers], [weakref.ref(a) for _, a in layers], keys, layout)


# -- what goes into a slot ------------------------------------------------------------------------------


def _factors_from_file(
    slot: Slot, entry: CachedAdapter, weights: dict[str, Tensor]
) -> dict[int, tuple[Tensor, Tensor, float]]:
    """Layer index -> (A, B, s) of a cached adapter, from `weights` (its tensors, maybe moved), checked first."""
    _check_plain(None, str(entry.path), entry.config, what="the")
    unknown = sorted(k for k in weights if k not in slot.keys)
    if any(".base_layer." in k for k in unknown):
        raise CacheError(
            f"the adapter in {entry.path} carries base-layer tensors ({[k for k in unknown if '.base_layer.' in k][:2]}"
            ": an adapted embed_tokens / lm_head saved whole, as PEFT's save_embedding_layers does); a hot swap "
            "changes factors only, so load it with load_adapter, or save it with save_embedding_layers=False"
        )
    if unknown:
        raise CacheError(
            f"the adapter in {entry.path} adapts what slot {slot.name!r} does not: {unknown[:4]}"
            f"{' ...' if len(unknown) > 4 else ''}; a slot holds adapters whose targets are a subset of its own"
        )
    pairs: dict[int, list] = {}
    for key, tensor in weights.items():
        i, which = slot.keys[key]
        pairs.setdefault(i, [None, None, key])[which] = tensor
    factors = {}
    for i, (A, B, key) in pairs.items():
        path = slot.paths[i]
        factors[i] = (A, B, entry.config.scale(*entry.config.rank_and_alpha(path)))
        _check_fits(slot, i, factors[i], f"{key} (in {entry.path})")
    return factors


def _factors_from_model(model: LoraModel, slot: Slot, name: str) -> dict[int, tuple[Tensor, Tensor, float]]:
    """Layer index -> (A, B, s) of adapter `name` of the model, checked against the slot."""
    _check_plain(model, name, model.peft_config[name], what="the")
    index = {p: i for i, p in enumerate(slot.paths)}
    factors = {}
    for path, layer in lora_layers(model.model):
        if name not in layer.adapters:
            continue
        if path not in index:
            raise CacheError(f"adapter {name!r} adapts {path}, which slot {slot.name!r} does not hold")
        adapter = layer.adapters[name]
        factors[index[path]] = (adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.scale)
        _check_fits(slot, index[path], factors[index[path]], f"{path}.lora_A/B of {name!r}")
    return factors


def _check_fits(slot: Slot, i: int, factors: tuple[Tensor, Tensor, float], what: str) -> None:
    lora_A, lora_B, _ = factors
    target = slot.adapters[i]
    r = lora_A.shape[0] if lora_A is not None else None
    if lora_A is None or lora_B is None:
        raise CacheError(f"{what}: the file has only one of lora_A / lora_B for {slot.paths[i]}; it is incomplete")
    fits = (
        lora_A.shape[1:] == target.lora_A.shape[1:]
        and lora_B.shape[0] == target.lora_B.shape[0]
        and lora_B.shape[2:] == target.lora_B.shape[2:]
        and lora_B.shape[1] == r
    )
    if not fits:
        raise CacheError(
            f"{what}: A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not fit {slot.paths[i]}, whose factors "
            f"are A {tuple(target.lora_A.shape)} and B {tuple(target.lora_B.shape)} at rank {slot.rank}: "
            "was the adapter trained on another base model?"
        )
    if r > slot.rank:
        raise CacheError(
            f"{what}: rank {r} is larger than slot {slot.name!r}'s rank {slot.rank}; call "
            f"prepare_slot(model, {slot.name!r}, rank={r}) (before torch.compile) to make room"
        )


def hotswap_adapter(model: LoraModel, source: str | Path, adapter_name: str, rank: int | None = None) -> None:
    """Copies adapter `source` (a loaded adapter's name, else a folder) into slot `adapter_name`, in place.

    The model's adapter_cache, when attached, serves folders from RAM and keeps recent ones staged on the
    device. Everything is checked before the slot changes; the slot keeps its own targets and dropout."""
    slot = prepare_slot(model, adapter_name, rank)
    if isinstance(source, str) and source in model.peft_config:
        staged = slot.stage(_factors_from_model(model, slot, source))
    else:
        cache = getattr(model, "adapter_cache", None) or AdapterCache(device_slots=0, pin_memory=False)
        staged = cache.staged(cache.get(source), slot)
    slot.load(staged)
