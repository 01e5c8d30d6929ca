"""Modules trained in full next to the adapters (modules_to_save), one trainable copy per adapter."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.state import AdapterState, Routing


class SavedModule(nn.Module):
    """Runs the copy of the active adapter that has one, else the untouched original; routed per row, each row
    group runs through the copy of its path's adapter."""

    def __init__(self, original_module: nn.Module, state: AdapterState | None = None) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.state = state or AdapterState()  # the model's, once a LoraModel owns this module

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)
        self.state.know(name)

    @property
    def active_adapters(self) -> list[str]:
        return [n for n in self.state.active if n in self.copies]

    def current(self) -> nn.Module:
        """The module an unrouted forward runs: the one active adapter's copy, or the original."""
        if not self.state.enabled:
            return self.original_module
        return self.copy_for(self.state.active)

    def copy_for(self, names: Sequence[str]) -> nn.Module:
        """The copy of the one adapter among `names` that has one here, else the original; two is an error,
        as in PEFT: a whole module cannot be the sum of two trained copies."""
        owners = [n for n in names if n in self.copies]
        if len(owners) > 1:
            raise LorakitError(
                f"adapters {owners} each train their own copy of this {type(self.original_module).__name__} "
                "(modules_to_save), and only one copy can run; activate only one of them"
            )
        return self.copies[owners[0]] if owners else self.original_module

    def forward(self, *args, **kwargs):
        routing = self.state.routing_now() if self.state.enabled else None
        if routing is None or not any(n in self.copies for n in routing.rows):
            return self.current()(*args, **kwargs)
        return self._routed(routing, args, kwargs)

    def _routed(self, routing: Routing, args: tuple, kwargs: dict) -> Tensor:
        """Each row group through its own module, the outputs put back in row order."""
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        n = first.shape[0]
        _, groups = routing.rows_for(n, first.device)
        out = None
        for path, idx in groups.items():
            part = self.copy_for(path)(*_rows(args, idx, n), **_rows(kwargs, idx, n))
            if not isinstance(part, Tensor):
                raise LorakitError(
                    f"modules_to_save {type(self.original_module).__name__} returns {type(part).__name__}, not a "
                    "tensor, so its rows cannot be routed per adapter; serve its adapters one batch at a time"
                )
            out = part.new_zeros((n, *part.shape[1:])) if out is None else out
            out = out.index_copy(0, idx, part)
        return out

    def __getattr__(self, name: str):
        """A name the wrapper lacks is read from the module an unrouted forward runs (PEFT's ModulesToSaveWrapper):
        a parent that reads its child's tensors without calling it (MobileBERT's head: decoder.weight, decoder.bias)
        gets the active copy's. A routed forward does not change what is read here."""
        try:
            return super().__getattr__(name)  # the wrapper's own submodules, parameters and buffers
        except AttributeError:
            own = self.__dict__
            # half-built (a copy or unpickling in progress) or a dunder that copy and pickle probe for: nothing there
            if "state" not in own or "_modules" not in own or name.startswith("__"):
                raise
        return getattr(self.current(), name)


def _rows(values, idx: Tensor, n: int):
    """The tensors among `values` (a tuple or a dict) with n rows, restricted to rows `idx`; others as they are."""
    if isinstance(values, dict):
        return {k: _pick(v, idx, n) for k, v in values.items()}
    return tuple(_pick(v, idx, n) for v in values)


def _pick(value, idx: Tensor, n: int):
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
        return value.index_select(0, idx)
    return value
