"""AdapterState: which adapters take part, which train, how they nest, and which rows use which.

One object, owned by LoraModel and referenced (never copied) by every LoraLayer and SavedModule, so a change
is seen everywhere at once. What stays per layer is only what is per layer by nature: the adapters it holds and
which of them are merged into its weight.

    active      ordered names whose contributions add up in an unrouted forward (a tree node brings its path)
    trainable   the names whose factors get gradients; separate from active (a child trains, its path is frozen)
    enabled     False inside `disable_adapter()`: every layer is its base layer
    parents     every known adapter -> its parent (None for a root): the tree
    routing     for the duration of one forward / generate: which batch rows use which adapters

Activation checkpointing runs a forward again inside backward, after the routed call has returned: a routed
forward marks its outputs so that the backward through them replays its routing (`routing_now`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorakit.errors import LorakitError

BASE = "__base__"  # PEFT's name for "no adapter on this row"
ROUTINGS_KEPT = 64  # the Routing of each recent adapter_names list, so decode steps reuse their row tensors


@dataclass(frozen=True)
class Routing:
    """Row -> adapters for one batch. `rows[name]` lists (int64, ascending) every row whose path contains `name`;
    `groups` maps each distinct path (root..node; () = the base) to its rows, for modules that run a row group
    through one module (modules_to_save copies). Never changed once built: AdapterState hands the same object to
    every call with the same adapter_names, and the ops key their caches on its row tensors."""

    batch_size: int
    rows: dict[str, Tensor]
    groups: dict[tuple[str, ...], Tensor]
    ranges: dict[str, tuple[int, int]] | None = None  # rows as [start, stop) where they are ranges (spans_for)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def rows_for(self, n: int, device: torch.device) -> tuple[dict[str, Tensor], dict[tuple[str, ...], Tensor]]:
        """(rows, groups) for a layer input of n rows on `device`. n may be k * batch_size: generate repeats each
        row k times in place (num_beams / num_return_sequences), and a layer that flattens (batch, seq) into rows
        does the same, so row i of the batch becomes rows i*k .. i*k+k-1."""
        key = (n, device)
        if key not in self._cache:
            if n % self.batch_size:
                raise LorakitError(
                    f"a layer got {n} rows but adapter_names has {self.batch_size} entries; give one name per row "
                    "of the batch (a layer that mixes rows of different samples cannot be routed per row)"
                )
            k = n // self.batch_size
            with torch.inference_mode(False):  # kept across calls: usable in a later forward that records grads
                self._cache[key] = (
                    {name: _expand(idx, k).to(device) for name, idx in self.rows.items()},
                    {path: _expand(idx, k).to(device) for path, idx in self.groups.items()},
                )
        return self._cache[key]

    def slots_for(self, numbers: tuple[str, ...], device: torch.device, width: int = 1) -> Tensor:
        """(batch_size x P) int32 on `device`: each row's adapters by their position in `numbers`, -1 past the
        end of a row's path; P is `width` or the longest path if longer (a tree's depth: every routing of one
        tree then has the same shape, so a compiled model reads it without compiling again). What the gathered
        decode kernels read (ops.gathered)."""
        last = self._cache.get("slots")  # a decode step asks again for the same: no 64-name key hashed
        if last is not None and last[0] is numbers and last[1] == (device, width):
            return last[2]
        key = ("slots", numbers, device, width)
        if key not in self._cache:
            position = {name: i for i, name in enumerate(numbers)}
            per_row: list[list[int]] = [[] for _ in range(self.batch_size)]
            for name, idx in self.rows.items():
                for i in idx.tolist():
                    per_row[i].append(position[name])
            width = max(width, *map(len, per_row))
            table = [row + [-1] * (width - len(row)) for row in per_row]
            with torch.inference_mode(False):
                self._cache[key] = torch.tensor(table, dtype=torch.int32).to(device, non_blocking=True)
        self._cache["slots"] = (numbers, (device, width), self._cache[key])
        return self._cache[key]

    def spans_for(self, n: int) -> dict[str, tuple[int, int]] | None:
        """Each adapter's rows of an n-row layer input as one range [start, stop), where every adapter's rows are
        consecutive and no row is under two adapters (parallel training concatenates its jobs' batches so); else
        None. A range is a view of x, where a list of rows is a gather and a scatter, in backward too."""
        if self.ranges is None or n % self.batch_size:
            return None
        k = n // self.batch_size  # plain ints: no tensor read inside a compiled layer
        return {name: (start * k, stop * k) for name, (start, stop) in self.ranges.items()}


def _expand(idx: Tensor, k: int) -> Tensor:
    return idx if k == 1 else (idx[:, None] * k + torch.arange(k)).flatten()


def _ranges(rows: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]] | None:
    """rows (ascending) as ranges [start, stop), or None (see Routing.spans_for)."""
    spans = {}
    for name, idx in rows.items():
        first, last = (idx[0], idx[-1]) if idx else (0, -1)
        if last - first + 1 != len(idx):
            return None
        spans[name] = (first, last + 1)
    ranges = sorted(s for s in spans.values() if s[1] > s[0])
    if any(stop > start for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False)):
        return None
    return spans


ENTRY_HOOKS: list[Callable[[AdapterState, Routing], None]] = []  # run as a routed block starts (lorakit.layer's)
# gather_token -> the state whose routed block is running, for the compiled layers that read its gathered tables:
# every layer reaches the state through this one place, where a reference of its own each would make a compiled
# step check, layer by layer, that they are all the same object
GATHERING: dict[int, AdapterState] = {}
_FRESH: weakref.WeakSet[AdapterState] = weakref.WeakSet()  # the states whose gathered tables or pack are current


def tables_stale() -> None:
    """An adapter or layer changed: no state's gathered tables are read again until rebuilt (lorakit.layer). A flag
    per state, not a counter, so a compiled graph guards one bool: two graphs at most, never a recompile per change."""
    if not _FRESH:  # the common case, on every attribute an adapter sets
        return
    for state in list(_FRESH):
        state.gather_fresh = False
        packs_stale(state)
    _FRESH.clear()


def tables_fresh(state: AdapterState) -> None:
    state.gather_fresh = True
    _FRESH.add(state)


STALE_HOOKS: list[Callable[[AdapterState], None]] = []  # run as a state's pack goes stale (lorakit.packed's)


def packs_fresh(state: AdapterState) -> None:
    state.pack_fresh = True
    _FRESH.add(state)


def packs_stale(state: AdapterState) -> None:
    """The layers stop reading the state's pack at once (a compiled graph guards each layer's offsets, which go)."""
    if state.pack_fresh:
        state.pack_fresh = False
        for hook in STALE_HOOKS:
            hook(state)


class AdapterState:
    """The adapter bookkeeping every layer reads; see the module docstring for the fields."""

    # the gathered decode path's (lorakit.layer): the routing's slots, on the device of the layers' tables, set as a
    # routed block starts without gradients; the adapters' numbering; what the tables were last built for
    gather_slots: Tensor | None = None
    gather_fresh = False  # no change since the tables were built (or dropped): a compiled graph reads them only then
    gather_numbers: tuple[str, ...] = ()
    gather_width = 1
    gather_device: torch.device | None = None
    gather_owner: int | None = None  # id() of the state the tables were built for (a deep copy's differs)
    gather_token: int | None = None  # this state's key in GATHERING, given as its tables are first built
    gather_wanted = False  # set by a compiled model's routed layers
    gather_built = False  # the tables are there (else dropped, until a compiled model wants them)
    gather_groups: dict = {}  # noqa: RUF012 (replaced whole, never changed in place) siblings' bases by key
    # lorakit.packed's: the live adapter's factors in one buffer for compiled unrouted inference steps
    pack_fresh = False  # no change since the layers were given their offsets
    pack_wanted = False  # set by a compiled model's unrouted inference step
    pack_owner: int | None = None  # id() of the state the buffers were made for (a deep copy's differs)
    pack_active: tuple[str, ...] = ()  # the active adapters they were made for

    def __init__(self) -> None:
        self.active: list[str] = []
        self.trainable: set[str] = set()
        self._enabled = True
        self.parents: dict[str, str | None] = {}
        self.routing: Routing | None = None
        self._routings: OrderedDict[tuple[str, ...], Routing] = OrderedDict()  # recent; cleared when the tree changes
        self._replayed: tuple[int, Routing | None] | None = None  # (backward's graph task, its routing)

    # -- the tree ----------------------------------------------------------------------------------
    def add(self, name: str, parent: str | None = None) -> None:
        """Registers adapter `name` under `parent` (None: a root)."""
        if name in self.parents:
            raise LorakitError(f"adapter {name!r} exists already; delete_adapter({name!r}) first")
        if parent == name:
            raise LorakitError(f"adapter {name!r} cannot be its own parent (a tree has no cycles)")
        if parent is not None and parent not in self.parents:
            raise LorakitError(f"parent {parent!r} is not a loaded adapter; loaded: {sorted(self.parents)}")
        self.parents[name] = parent
        self._routings.clear()
        tables_stale()

    def remove(self, name: str) -> None:
        children = self.children(name)
        if children:
            raise LorakitError(
                f"adapter {name!r} is the parent of {children}; delete those children first (a child's delta is "
                "defined on top of its parent's)"
            )
        del self.parents[name]
        self._routings.clear()
        tables_stale()
        self.active = [n for n in self.active if n != name]
        self.trainable.discard(name)

    def know(self, name: str) -> None:
        """A layer's new adapter: unknown names (a LoraLayer used without a LoraModel) become known, and the first
        one active and trainable, as PEFT's layers start with their first adapter active."""
        if name not in self.parents:
            self.parents[name] = None
            self._routings.clear()
            tables_stale()
            if not self.active:
                self.active, self.trainable = [name], {name}

    def children(self, name: str) -> list[str]:
        return [n for n, p in self.parents.items() if p == name]

    def path(self, name: str) -> list[str]:
        """root .. name: the adapters whose deltas add up to the model at node `name`."""
        self.check_known([name])
        path = [name]
        while self.parents[path[-1]] is not None:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def paths(self, names: Sequence[str]) -> list[str]:
        """The union of the paths of `names`, each name once, ancestors first."""
        return list(dict.fromkeys(n for name in names for n in self.path(name)))

    def depth(self) -> int:
        """The longest path in the tree (1 without nesting, 0 without adapters)."""
        return max((len(self.path(name)) for name in self.parents), default=0)

    def check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.parents]
        if unknown:
            raise LorakitError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.parents)}")

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Packed layers read their offsets without asking the state (lorakit.layer), so a change takes them away."""
        if value != self._enabled:
            packs_stale(self)
        self._enabled = value

    # -- what takes part ---------------------------------------------------------------------------
    def activate(self, names: Sequence[str], trainable: Sequence[str] | None = None) -> None:
        """Active = the paths of `names`; trainable = `names` themselves unless given (ancestors stay frozen)."""
        active = self.paths(names)
        trainable = list(names) if trainable is None else list(trainable)
        self.check_known(trainable)
        self.active, self.trainable = active, set(trainable)
        packs_stale(self)

    def live(self, present: Sequence[str]) -> list[str]:
        """Active names among `present` (a layer's unmerged adapters), in activation order; none when disabled."""
        if not self.enabled:
            return []
        return [n for n in self.active if n in present]

    # -- per-row routing ---------------------------------------------------------------------------
    def routing_for(self, adapter_names: Sequence[str]) -> Routing:
        """The Routing for one adapter name (or BASE) per batch row; a tree node stands for its whole path. The same
        list of names gets the same Routing while the tree is unchanged (a server's decode steps repeat it)."""
        if isinstance(adapter_names, str):
            raise _not_names(adapter_names)
        try:
            key = tuple(adapter_names)
            routing = self._routings.pop(key, None)  # a key kept here was checked when its Routing was made
        except TypeError:  # not iterable, or a name that is not even hashable
            raise _not_names(adapter_names) from None
        if routing is None:
            if not all(isinstance(n, str) for n in key):
                raise _not_names(adapter_names)
            routing = self._new_routing(key)
        self._routings[key] = routing  # now the most recent
        while len(self._routings) > ROUTINGS_KEPT:
            self._routings.popitem(last=False)
        return routing

    def _new_routing(self, adapter_names: Sequence[str]) -> Routing:
        if not adapter_names:
            raise LorakitError("adapter_names is empty; give one adapter name (or '__base__') per row of the batch")
        self.check_known([n for n in dict.fromkeys(adapter_names) if n != BASE])
        by_path: dict[tuple[str, ...], list[int]] = {}
        for i, name in enumerate(adapter_names):
            by_path.setdefault(() if name == BASE else tuple(self.path(name)), []).append(i)
        rows: dict[str, list[int]] = {}
        for path, idx in by_path.items():
            for name in path:
                rows.setdefault(name, []).extend(idx)
        rows = {n: sorted(i) for n, i in rows.items()}
        with torch.inference_mode(False):  # kept across calls: usable in a later forward that records grads
            groups = {path: torch.tensor(idx, dtype=torch.long) for path, idx in by_path.items()}
            rows_t = {n: torch.tensor(i, dtype=torch.long) for n, i in rows.items()}
        return Routing(len(adapter_names), rows_t, groups, _ranges(rows))

    def routed(self, routing: Routing) -> _Routed:
        """Routes rows for the duration of the block (`with state.routed(routing):`); cleared on the way out,
        exceptions included."""
        return _Routed(self, routing)

    def routing_now(self) -> Routing | None:
        """The routing a forward runs under: the routed block's, or, in a backward, the routing of the routed forward
        it goes through, which activation checkpointing recomputes after the routed call has returned."""
        if self.routing is not None or self._replayed is None or torch.compiler.is_compiling():
            return self.routing  # a compiled graph recomputes in its own backward, never through this forward
        task, routing = self._replayed
        if task != torch._C._current_graph_task_id():
            return None  # a stale mark from an earlier backward, or no backward at all
        if routing is None:
            raise LorakitError(
                "one backward goes through several routed forwards and activation checkpointing recomputes them, so "
                "which rows use which adapters is ambiguous; call backward() once per routed forward, or route all "
                "rows in one call"
            )
        return routing

    def replay_in_backward(self, outputs: object, routing: Routing) -> None:
        """Marks the tensors in `outputs` (nested in tuples, lists, dicts) so that a backward through any of them
        sees `routing` in the forwards it recomputes (activation checkpointing)."""

        def mark(_grad: Tensor) -> None:
            task = torch._C._current_graph_task_id()
            clash = self._replayed is not None and self._replayed[0] == task and self._replayed[1] is not routing
            self._replayed = (task, None if clash else routing)

        for tensor in _tensors(outputs):
            if tensor.requires_grad:
                tensor.register_hook(mark)


class _Routed:
    """AdapterState.routed's block: a class, not a generator, as it is entered at every routed call (a server's
    decode steps)."""

    __slots__ = ("routing", "state", "token")

    def __init__(self, state: AdapterState, routing: Routing) -> None:
        self.state, self.routing, self.token = state, routing, None

    def __enter__(self) -> Routing:
        state = self.state
        if state.routing is not None:
            raise LorakitError("a routed forward is already running; routed calls do not nest")
        state.routing = self.routing
        packs_stale(state)  # a routed step never reads the pack: its layers' offsets go until the next unrouted call
        try:
            for hook in ENTRY_HOOKS:
                hook(state, self.routing)
            self.token = state.gather_token
            if self.token is not None:
                GATHERING[self.token] = state
        except BaseException:
            self.__exit__()
            raise
        return self.routing

    def __exit__(self, *exc: object) -> None:
        state = self.state
        state.routing = None
        if state.gather_slots is not None:
            state.gather_slots = None
        GATHERING.pop(self.token, None)


def _not_names(adapter_names: object) -> LorakitError:
    return LorakitError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
