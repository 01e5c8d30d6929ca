"""LoraLayer: a base layer and its named adapters; one forward, one merge, for every kind.

    forward(x) = base(x) + sum_{a live} s_a * B_a(A_a(dropout(x)))          unrouted: every row, same adapters
    forward(x)[i] = base(x)[i] + sum_{a on row i's path} s_a * B_a(A_a(dropout(x[i])))    routed per row

`live` = active in the model's AdapterState, present here, not merged. The LoRA terms are summed in the factors'
dtype (fp32 by default) and added to the base output before one rounding to its dtype, as PEFT does. Plain
LoRA on a matmul kind goes through ops.lora_linear / ops.add_lora / ops.add_routed_lora (the op boundary GPU
kernels replace); other kinds and variants (embedding, conv, DoRA, VeRA, LoRA-FA) add their variant's
contribution, per row group when routed.

Kinds that act on the weight (target_parameters) get W + sum_a dW_a through torch parametrization
instead, so the base module's own forward runs unchanged; they cannot be routed per row. Several weights of one
module (a fused MoE block's gate_up_proj and down_proj) get one such layer each, nested as PEFT nests its
ParamWrappers: each layer's base_layer is the next, the innermost's the module that holds the weights.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)
from torch.nn.utils import parametrize

from lorakit import ops, packed, plans
from lorakit.adapter import Adapter
from lorakit.errors import LorakitError
from lorakit.kinds import Kind, own_parameter_names
from lorakit.ops import routed_dense
from lorakit.state import ENTRY_HOOKS, GATHERING, AdapterState, Routing, tables_fresh, tables_stale

PLANS_KEPT = 16  # routed plans per layer: a server's decode steps between prefills of requests for other adapters


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, kind: Kind, state: AdapterState | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        # read by every forward: a bool of the layer's own, so a compiled model guards one value per layer instead
        # of the identity of the kind object that all layers of its kind share
        self.acts_on_weight = kind.acts_on_weight
        self.adapters = _Adapters()
        self.state = state or AdapterState()  # the model's, once a LoraModel owns this layer
        self.merged_adapters: list[str] = []
        self._routed_plans: dict[tuple, _RoutedPlan] = {}  # the last few routed forwards', see _routed
        self._plan = plans.EMPTY  # what a compiled step is specialised on here, by number (lorakit.plans)
        self._gather = None  # the adapters by number, see _gathered
        self._merge_steps: list[tuple[list[str], list[Tensor | float]]] = []
        _register(self)
        if kind.acts_on_weight:
            host = self.weight_host
            # the module's own weight order, read before any is parametrized: files name nested layers by it
            nested = isinstance(base_layer, LoraLayer)
            self.weight_order = base_layer.weight_order if nested else tuple(own_parameter_names(host))
            parametrize.register_parametrization(host, kind.weight_name(), _WeightDelta(self))

    @property
    def _gather(self) -> ops.gathered.GatherTable | None:
        return self.__dict__["_table"]

    @_gather.setter
    def _gather(self, table: ops.gathered.GatherTable | None) -> None:
        """A layer without a table is routed the usual way: its plan loses the table and what reads through it."""
        self.__dict__["_table"] = table
        if table is None:
            plans.set_plan(self, table=None, group=None, token=None)
        else:
            plans.set_plan(self, table=table.ref)

    @property
    def _fast(self) -> tuple | None:
        """Where lorakit.packed put the live adapter's factors (see _packed_linear)."""
        return plans.of(self).fast

    @property
    def _gather_group(self) -> tuple | None:
        """(key, index, tables) among siblings gathered in one launch (see _siblings)."""
        return plans.of(self).group

    @property
    def weight_host(self) -> nn.Module:
        """The module that holds the weight: the base layer, or below the other weight layers it is nested in."""
        module = self.base_layer
        while isinstance(module, LoraLayer):
            module = module.base_layer
        return module

    @property
    def weight(self) -> Tensor:
        """The weight as the base module uses it: with the live deltas where the kind acts on the weight, since
        a module may read its child's weight directly (nn.MultiheadAttention reads out_proj.weight)."""
        if self.kind.acts_on_weight:
            return getattr(self.weight_host, self.kind.weight_name())
        return self.stored_weight

    @property
    def stored_weight(self) -> Tensor:
        """The stored base weight (merged adapters included, unmerged ones not). A layer on the output reads the
        weight the module computes, which under a parametrization of its own (torch's weight_norm: g and v) is
        stored by the parametrization's right_inverse when merged."""
        name, host = self.kind.weight_name(), self.weight_host
        if self.kind.acts_on_weight and parametrize.is_parametrized(host, name):
            return host.parametrizations[name].original
        return self.kind.weight_of(host)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        """PEFT's: the adapted weight's input size (a conv's in_channels, an embedding's num_embeddings), which code
        written for PEFT reads off any LoRA layer."""
        return self.kind.in_out(self.stored_weight)[0]

    @property
    def out_features(self) -> int:
        """PEFT's: the adapted weight's output size (a conv's out_channels, an embedding's embedding_dim)."""
        return self.kind.in_out(self.stored_weight)[1]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        plan = plans.plan(self._plan)  # compiled: one guarded number, the rest constants of the graph
        fast = plan.fast  # set only while one plain adapter is live, enabled, unrouted (lorakit.packed)
        if fast is not None and _reads_pack(self, fast, args, kwargs):  # first: the state is not read, so a compiled
            y = _packed_linear(self, x, fast)  # step guards none of it per layer
            if y is not None:
                return y
        group = plan.group  # a routed decode step's sibling whose output is already stashed:
        if group is not None and not (args or kwargs) and _stashed(self, x, plan):  # the state is not read either
            return _taken(x, (group[0], group[1], None))
        token = plan.token  # a compiled routed decode step: the state read from GATHERING
        if token is not None and not (args or kwargs) and torch.compiler.is_compiling():
            y = _gathered_step(self, x, plan, GATHERING.get(token))
            if y is not None:
                return y
        routing = self.state.routing_now() if self.state.enabled else None
        outside = routing is not None and _outside_graph(self)  # compiled inference: checked when the op runs
        if routing is not None and not outside:
            self._refuse_merged_routing()
        if self.acts_on_weight:
            if routing is not None and any(n in self.adapters for n in routing.rows):
                raise LorakitError(_UNROUTABLE)
            return self.base_layer(x, *args, **kwargs)  # the parametrization has already added the deltas
        if outside and not (args or kwargs) and plan.group is not None:
            y = _siblings(self, x, plan, self.state)  # q, k and v of a decode step in one launch
            if y is not None:
                return y
        if routing is not None:
            base = self._modules["base_layer"]
            bare = not args and not kwargs and _is_bare_linear(base)  # F.linear itself: no module call's overhead
            out = F.linear(x, _tensor(base, "weight"), _tensor(base, "bias")) if bare else base(x, *args, **kwargs)
            return _routed_outside_graph(self, x, out) if outside else self._routed(x, routing, out)
        base = self._modules["base_layer"]  # nn.Module's attribute lookup costs ~1 us a name, every layer, every call
        if fast is None and _wants_pack(self, base, x, args, kwargs):
            self.state.pack_wanted = True  # the model's next unrouted call gives the layers their offsets
        adapters = self.live_adapters()
        factors = [_plain_factors(a) for a in adapters]
        plain = [f for f in factors if f is not None]
        bare = not args and not kwargs and _is_bare_linear(base)
        if plain and len(plain) == len(adapters) and bare:
            return ops.lora_linear(x, _tensor(base, "weight"), _tensor(base, "bias"), plain, self.training)
        if bare and len(adapters) == 1 and not plain:  # a variant that computes the whole output itself (DoRA)
            whole = getattr(adapters[0].variant, "linear_output", None)
            y = None if whole is None else whole(adapters[0], base, x)
            if y is not None:
                return y
        out = base(x, *args, **kwargs)
        if not adapters:
            return out
        acc = out.to(_sum_dtype(out, adapters, factors))
        if plain:
            acc = ops.add_lora(acc, x, plain, self.training)
        for adapter, f in zip(adapters, factors, strict=True):
            if f is None:
                acc = acc + adapter.contribution(base, x, out)
        return acc.to(out.dtype)

    def _refuse_merged_routing(self) -> None:
        if self.merged_adapters:  # in every row's weight, whatever the row's adapter
            raise LorakitError(
                f"adapters {self.merged_adapters} are merged into the weights; unmerge_adapter() before routing rows"
            )

    def _routed(self, x: Tensor, routing: Routing, out: Tensor) -> Tensor:
        """base(x) plus, for every routed adapter held here, its term on its own rows only. What that needs is kept
        for the next call with the same Routing (every decode step of a generation, every layer of a server's
        step): checking it is a few reads per adapter, building it a pass over the routed adapters and their ops."""
        key = (x.shape[:-1], x.dtype, x.device, out.dtype, torch.is_grad_enabled(), self.training)
        if torch.compiler.is_compiling():  # traced once: nothing to keep, and no storage to stamp
            return _RoutedPlan(self, routing, key, x, out)(self.base_layer, x, out)
        modules = self._modules
        plans, held = self._routed_plans, modules["adapters"]._modules  # a plan holds its Routing: its id names no
        plan = plans.pop((id(routing), key), None)  # other, and goes back in last: the least recently used go first
        if plan is None or not plan.valid(held):
            plan = self._new_plan(routing, key, x, out)
            if len(plans) >= PLANS_KEPT:
                plans.pop(next(iter(plans)), None)
        plans[id(routing), key] = plan
        return plan(modules["base_layer"], x, out)

    def _new_plan(self, routing: Routing, key: tuple, x: Tensor, out: Tensor) -> _RoutedPlan:
        """A kept plan of the same adapters for other rows (rows joined or left a server's batch) is rebound to
        the new rows, its checks and factors kept. A decode step may also take a plan of more adapters (those
        without rows add nothing), and a new one covers the latest step's adapters too, so a batch whose requests
        come and go over a few adapters soon stops building plans. Else a plan is built from the adapters."""
        held = self.adapters._modules
        names = [n for n in routing.rows if n in held]
        kin = [p for p in reversed(self._routed_plans.values()) if p.key[1:] == key[1:]]
        decoding = _one_token_a_row(key)
        for plan in kin:
            if (plan.names == names or decoding and plan.decoding and plan.covers(names)) and plan.valid(held):
                return plan.rebound(routing, key, x, out)
        latest = next((p for p in kin if p.decoding and p.valid(held)), None) if decoding else None
        if latest is not None:
            union = names + [n for n in latest.names if n not in routing.rows]
            if _dense_takes(x, sum(held[n].r for n in union)):  # elsewhere idle adapters would cost every call
                return _RoutedPlan(self, routing, key, x, out, union).sealed()
        return _RoutedPlan(self, routing, key, x, out).sealed()

    def _gather_table(self, numbers: tuple[str, ...]) -> ops.gathered.GatherTable | None:
        """This layer's adapters by their number in `numbers`, where the gathered kernels can read them all."""
        if self.acts_on_weight or self.merged_adapters:
            return None
        held, factors = self.adapters._modules, []
        for name in numbers:
            adapter = held.get(name)
            found = None if adapter is None else _plain_factors(adapter)
            if adapter is not None and found is None:  # a variant's own term: the kept plans route it
                return None
            factors.append(found)
        device = next((f.lora_A.device for f in factors if f is not None), None)
        if device is None or device.type not in GATHER_DEVICES:
            return None
        return ops.gather_table(factors)

    def live_adapters(self) -> list[Adapter]:
        """Adapters that take part in an unrouted forward: enabled, active, present here and not merged."""
        held, merged = self._modules["adapters"]._modules, self.merged_adapters
        present = [n for n in held if n not in merged]
        return [held[n] for n in self.state.live(present)]

    # -- adapters by name --------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before replacing it")
        self.adapters[name] = adapter  # a change the gathered tables see (_Adapters)
        self._routed_plans = {}
        self.state.know(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        del self.adapters[name]
        self._routed_plans = {}  # they hold the adapter's tensors
        self._gather = None  # so does the table (rebuilt as the next routed block starts, where it is used)

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        """W <- W + sum dW for the named adapters not merged yet (rows rescaled first where a variant asks)."""
        names = self._unmerged(names)
        if not names:
            return
        weight = self.stored_weight
        scales = [self.adapters[n].weight_scale(weight) for n in names]
        merged = ops.rescaled_merge(weight, scales, [self.adapters[n].delta_weight() for n in names])
        self._shift_bias(names, 1)
        self._store_weight(weight, merged)
        self._merge_steps.append((names, scales))  # the scales depend on W, so unmerge needs these ones
        self.merged_adapters.extend(names)
        tables_stale()

    def check_mergeable(self, names: list[str]) -> None:
        """Raises if merging the named adapters would put NaN or inf into the weight."""
        names = self._unmerged(names)
        weight = self.stored_weight
        scales = [self.adapters[n].weight_scale(weight) for n in names]
        merged = ops.rescaled_merge(weight, scales, [self.adapters[n].delta_weight() for n in names])
        if names and not torch.isfinite(merged).all():
            raise LorakitError(  # PEFT's words first: code written for PEFT may match them
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken: merging "
                f"{names} would put NaN/inf into the weights of this {type(self.base_layer).__name__}; nothing was "
                "merged"
            )

    def _store_weight(self, weight: Tensor, value: Tensor) -> Tensor:
        """A stored Parameter is updated in place (ties and optimizers keep it); a computed weight, such as
        a 4-bit base's dequantized one, is assigned, so the base layer stores it its own way."""
        with torch.no_grad():
            if isinstance(weight, nn.Parameter):
                return weight.copy_(value.to(weight.dtype))
            self.kind.store_weight(self.weight_host, value.to(weight.dtype))
        return self.stored_weight

    def _shift_bias(self, names: list[str], sign: int) -> None:
        """bias <- bias + sign * s * lora_B's bias, for adapters that train one (PEFT's lora_bias)."""
        shifts = [shift for shift in (self.adapters[n].bias_delta() for n in names) if shift is not None]
        if not shifts:
            return
        if self.bias is None:
            raise LorakitError(
                f"adapters {names} train a bias (lora_bias=True), but this {type(self.base_layer).__name__} has "
                "none to merge it into (PEFT cannot merge it either); keep them unmerged"
            )
        with torch.no_grad():
            self.bias.add_(sign * sum(shifts).to(self.bias.dtype))

    def _unmerged(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.adapters and n not in self.merged_adapters]

    def unmerge(self) -> None:
        """W <- W - sum dW for every merged adapter: back to the base weight within one rounding step."""
        weight = self.stored_weight
        for names, scales in reversed(self._merge_steps):
            restored = ops.rescaled_unmerge(weight, scales, [self.adapters[n].delta_weight() for n in names])
            weight = self._store_weight(weight, restored)
            self._shift_bias(names, -1)
        self._merge_steps = []
        self.merged_adapters = []
        tables_stale()

    def unwrap(self) -> nn.Module:
        """The base layer alone, with whatever is merged kept in its weight."""
        name, host = self.kind.weight_name(), self.weight_host
        if self.kind.acts_on_weight and parametrize.is_parametrized(host, name):
            parametrize.remove_parametrizations(host, name, leave_parametrized=False)
        return self.base_layer

    def __getstate__(self) -> dict:
        # a copy builds its own from its own adapters
        return {**self.__dict__, "_routed_plans": {}, "_table": None, "_plan": plans.EMPTY}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.kind.after_copy(self.weight_host)  # a deep copy: the kind makes the copied base its own
        _register(self)  # and the copy is a layer of its own to the compiled routed op
        self.__dict__.setdefault("acts_on_weight", self.kind.acts_on_weight)  # a layer pickled before the flag
        self.__dict__.setdefault("_table", None)
        self.__dict__.setdefault("_plan", plans.EMPTY)

    def _apply(self, fn, recurse: bool = True):  # model.to() / .cuda() / .half(): the plan's copies would stay behind
        self._routed_plans = {}
        self._gather = None  # and the gathered table's addresses
        tables_stale()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = f"{self.kind.name}({self.kind.weight_name()})" if self.kind.acts_on_weight else self.kind.name
        return f"kind={kind}, active={self.active_adapters}, merged={self.merged_adapters}"

    # -- PEFT's per-layer attributes ---------------------------------------------------------------
    # For code written against PEFT's LoraLayer (layer.lora_A["default"].weight, layer.scaling, ...): views built
    # on each read over the adapters' own tensors and settings, holding nothing, so state_dict, named_modules and
    # parameters stay lorakit's and forward reads none of them. As in PEFT's LoraLayer, only LoRA adapters (with
    # factors A and B) show: PEFT keeps VeRA and trainable tokens in layers of other classes. Setting an entry
    # takes effect where PEFT's does (scaling, lora_dropout); the others are refused, naming what to do instead.
    @property
    def lora_A(self) -> Mapping[str, PeftFactor]:
        """name -> A as PEFT's lora_A[name] module shows it: .weight is the adapter's own tensor, so in-place changes
        (nn.init.zeros_(layer.lora_A[name].weight)) change the adapter. Empty on embeddings (lora_embedding_A)."""
        return _PeftView(self, "lora_A", lambda a: PeftFactor(a.lora_A, None), _factors_of(self, embedding=False))

    @property
    def lora_B(self) -> Mapping[str, PeftFactor]:
        """name -> B as PEFT's lora_B[name] module shows it: .weight, and .bias where lora_bias trains one."""
        return _PeftView(self, "lora_B", lambda a: PeftFactor(a.lora_B, a.lora_B_bias), _factors_of(self, False))

    @property
    def lora_embedding_A(self) -> Mapping[str, Tensor]:
        """name -> A of an embedding layer, the tensor itself (PEFT's ParameterDict); empty on other kinds."""
        return _PeftView(self, "lora_embedding_A", lambda a: a.lora_A, _factors_of(self, embedding=True))

    @property
    def lora_embedding_B(self) -> Mapping[str, Tensor]:
        return _PeftView(self, "lora_embedding_B", lambda a: a.lora_B, _factors_of(self, embedding=True))

    @property
    def lora_magnitude_vector(self) -> Mapping[str, PeftFactor]:
        """name -> DoRA's magnitude as PEFT's module shows it (.weight), for the DoRA adapters here."""
        names = [n for n in _factors_of(self) if hasattr(self.adapters[n].variant_state, "lora_magnitude_vector")]
        return _PeftView(self, "lora_magnitude_vector", _magnitude, names)

    @property
    def scaling(self) -> Mapping[str, float]:
        """name -> the scale s its term is multiplied by. Settable as in PEFT: layer.scaling[name] = 0.5 rescales
        that adapter's term here from the next call on (and in merges after it)."""
        return _PeftView(self, "scaling", lambda a: a.scale, _factors_of(self), write=_set_scale)

    @property
    def r(self) -> Mapping[str, int]:
        return _PeftView(self, "r", lambda a: a.r, _factors_of(self))

    @property
    def lora_alpha(self) -> Mapping[str, float]:
        return _PeftView(self, "lora_alpha", lambda a: a.alpha, _factors_of(self))

    @property
    def lora_dropout(self) -> Mapping[str, nn.Module]:
        """name -> the adapter's dropout module (nn.Identity where there is none, and on embeddings, whose input
        ids are never dropped out; PEFT keeps an unused nn.Dropout there). Settable to an nn.Dropout or nn.Identity."""
        return _PeftView(self, "lora_dropout", lambda a: a.dropout, _factors_of(self), write=_set_dropout)

    @property
    def use_dora(self) -> Mapping[str, bool]:
        return _PeftView(self, "use_dora", lambda a: a.variant.name == "dora", _factors_of(self))

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into this layer's weight (PEFT's)."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether the model runs with its adapters disabled (disable_adapter(), disable_adapter_layers())."""
        return not self.state.enabled

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters, held here or not, as PEFT's layers list them (a tree node brings its path);
        the ones this layer runs are live_adapters()."""
        return list(self.state.active)

    @property
    def active_adapter(self) -> list[str]:
        """PEFT's: the same list (PEFT's layer holds a list once its model has set the adapters)."""
        return self.active_adapters


class _Adapters(nn.ModuleDict):
    """A layer's adapters by name; an adapter put in or taken out here directly (not through add_adapter) is a
    change the gathered tables see too."""

    def __setitem__(self, key: str, module: nn.Module) -> None:
        tables_stale()
        super().__setitem__(key, module)

    def __delitem__(self, key: str) -> None:
        tables_stale()
        super().__delitem__(key)


# -- PEFT's per-layer attributes: the views LoraLayer's properties return ------------------------------------------
class PeftFactor:
    """One factor as PEFT's lora_A[name] / lora_B[name] module shows it, without being one (no forward, no state):
    .weight and .bias are the adapter's own tensors. They are changed in place; assigning them is refused, since the
    adapter would not see a new tensor."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    def __setattr__(self, name: str, value: object) -> None:
        raise LorakitError(
            f"lorakit's PEFT-style factor views do not take new tensors; change .{name} in place instead "
            f"(with torch.no_grad(): layer.lora_A[name].{name}.copy_(new))"
        )

    def __repr__(self) -> str:
        bias = "" if self.bias is None else f", bias={tuple(self.bias.shape)}"
        return f"PeftFactor(weight={tuple(self.weight.shape)}{bias})"


class _PeftView(Mapping):
    """name -> read(adapter) over the named adapters of a layer; write(adapter, value) where an entry may be set."""

    __slots__ = ("_layer", "_attr", "_read", "_names", "_write")

    def __init__(
        self,
        layer: LoraLayer,
        attr: str,
        read: Callable[[Adapter], object],
        names: list[str],
        write: Callable[[Adapter, object], None] | None = None,
    ) -> None:
        self._layer, self._attr, self._read, self._names, self._write = layer, attr, read, names, write

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        return self._read(self._layer.adapters[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __setitem__(self, name: str, value: object) -> None:
        if self._write is None:
            raise LorakitError(
                f"layer.{self._attr}[{name!r}] cannot be set in lorakit: it is fixed when the adapter is made (a "
                "new value would change no tensor, or the meaning of the ones trained); add the adapter again with "
                "the config you want, or set layer.scaling[name] to rescale its term"
            )
        if name not in self._names:
            raise KeyError(name)
        if name in self._layer.merged_adapters:  # unmerging subtracts the delta as it is then
            raise LorakitError(
                f"adapter {name!r} is merged into this layer's weight; unmerge_adapter() before setting it"
            )
        self._write(self._layer.adapters[name], value)

    def __delitem__(self, name: str) -> None:
        raise LorakitError(f"layer.{self._attr} is a view of the adapters; delete_adapter({name!r}) removes one")

    def __repr__(self) -> str:
        return f"{self._attr}({dict(self)!r})"


def _factors_of(layer: LoraLayer, embedding: bool | None = None) -> list[str]:
    """The adapters with factors A and B of their own (LoRA, DoRA, ...), on an embedding layer or not as asked."""
    if embedding is not None and embedding != layer.kind.is_embedding:
        return []
    held = layer.adapters._modules
    return [n for n, a in held.items() if all(getattr(a, f, None) is not None for f in ("lora_A", "lora_B"))]


def _magnitude(adapter: Adapter) -> PeftFactor:
    return PeftFactor(adapter.variant_state.lora_magnitude_vector, None)


def _set_scale(adapter: Adapter, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LorakitError(f"scaling takes a finite number, got {value!r}")
    adapter.scale = float(value)  # Adapter.__setattr__: kept plans and packed factors see the change


def _set_dropout(adapter: Adapter, module: nn.Module) -> None:
    if type(module) not in (nn.Dropout, nn.Identity):  # what the ops read: nn.Dropout's p, else no dropout
        raise LorakitError(f"lora_dropout takes an nn.Dropout or nn.Identity, got {type(module).__name__}")
    adapter.dropout = module


class _RoutedPlan:
    """One routed forward's adapters, rows and prepared op for a layer, reusable while `valid`: the layer holds the
    same adapter objects with the same scale, dropout, variant and bias, and their factors have not changed (version
    counters and storage: an optimizer step, copy_, model.to())."""

    def __init__(
        self, layer: LoraLayer, routing: Routing, key: tuple, x: Tensor, out: Tensor, names: list[str] | None = None
    ) -> None:
        held = layer.adapters._modules  # nn.Module's attribute lookup costs ~1 us a name
        self.routing, self.key, self.decoding = routing, key, _one_token_a_row(key)
        self.names = [n for n in routing.rows if n in held] if names is None else names  # given: some without rows
        self.adapters = [held[n] for n in self.names]
        rows = _rows(routing, x)
        plain, self.plain_names, self.others = [], [], []
        dtype = out.dtype  # the terms are summed in the widest of the output's and the adapters' dtypes
        for name, adapter in zip(self.names, self.adapters, strict=True):
            f = _plain_factors(adapter)
            if f is None:
                self.others.append((adapter, rows[name]))
            else:
                plain.append(f)
                self.plain_names.append(name)
            term_dtype = adapter.dtype if f is None else f.lora_B.dtype
            if term_dtype is not dtype:
                dtype = torch.promote_types(dtype, term_dtype)
        self.dtype, self.factors = dtype, [t for f in plain for t in (f.lora_A, f.lora_B)]
        self.plain, plain_rows = plain, [rows[n] for n in self.plain_names]
        # the sum may go into the base output itself unless a variant's term still reads it or a hook holds it
        base = layer.base_layer
        self.owned = dtype != out.dtype or not (self.others or base._forward_hooks or _global_forward_hooks)
        self.add_plain = None
        if plain:
            acc, spans = out.to(dtype), self._spans(routing, x)
            self.add_plain = ops.prepare_routed_lora(
                acc, x, plain, plain_rows, layer.training, owned=self.owned, spans=spans
            )

    def rebound(self, routing: Routing, key: tuple, x: Tensor, out: Tensor) -> _RoutedPlan:
        """This plan for another Routing of the same adapters: only what depends on the rows is rebuilt (on CUDA
        the dense op's row mask, which every layer shares)."""
        plan = copy.copy(self)
        plan.routing, plan.key = routing, key
        rows = _rows(routing, x)
        named = dict(zip(self.names, self.adapters, strict=True))
        plan.others = [(adapter, rows[n]) for n, adapter in named.items() if n not in self.plain_names]
        plain_rows = [rows[n] for n in self.plain_names]
        if self.plain:
            plan.add_plain = ops.prepare_routed_lora(
                out.to(self.dtype), x, self.plain, plain_rows, key[-1], like=self.add_plain, owned=self.owned,
                spans=plan._spans(routing, x),
            )  # fmt: skip
        return plan

    def _spans(self, routing: Routing, x: Tensor) -> list[tuple[int, int]] | None:
        """The plain adapters' rows as ranges where they are and a gradient is recorded (see Routing.spans_for)."""
        spans = routing.spans_for(x.shape[0]) if self.key[-2] and x.dim() >= 2 else None
        return None if spans is None else [spans.get(n, (0, 0)) for n in self.plain_names]

    def covers(self, names: list[str]) -> bool:
        return set(names) <= set(self.names)

    def sealed(self) -> _RoutedPlan:
        """The plan with what `valid` compares against recorded."""
        self.changes, self.marks, self.stamp = Adapter.changes, _marks(self.adapters), _stamp(self.factors)
        return self

    def valid(self, held: dict) -> bool:
        """The adapters' own attributes are re-read only after some adapter had one set (Adapter.changes), or in
        training, where a dropout's p, set on the dropout module, counts; the factors' contents at every call."""
        if list(map(held.get, self.names)) != self.adapters:  # modules compare by identity
            return False
        if self.changes != Adapter.changes or self.key[-1]:
            if _marks(self.adapters) != self.marks:
                return False
            self.changes = Adapter.changes
        return _stamp(self.factors) == self.stamp

    def __call__(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        acc = out if out.dtype == self.dtype else out.to(self.dtype)  # a call saved on every routed layer
        if self.add_plain is not None:
            acc = self.add_plain(acc, x)
        for adapter, idx in self.others:  # one group of rows through the variant's own contribution
            if not idx.numel():
                continue
            term = adapter.contribution(base, x.index_select(0, idx), out.index_select(0, idx))
            acc = acc.index_add(0, idx, term.to(acc.dtype))
        return acc if acc.dtype == out.dtype else acc.to(out.dtype)


# -- routed inference inside a compiled model ------------------------------------------------------
# Traced, a routing's rows and adapters become constants of the graph: every new adapter_names list (each step of a
# server) would compile the model again, and past torch's recompile limit run it eagerly whole. So a compiled model
# in eval mode, recording no gradient, calls one opaque op per routed layer, which runs the layer's kept plan for the
# routing of the moment; the layer is named by a number (a guarded constant of the graph), and the op is
# cudagraph-unsafe, so CUDA graphs replay the rest of the model around it and never a recorded routing. Training
# keeps the routed terms in the graph: parallel training routes every step the same way, and its backward goes
# through them.
_LAYERS: weakref.WeakValueDictionary[int, LoraLayer] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()
_UNSAFE_IN_GRAPHS = getattr(torch.Tag, "cudagraph_unsafe", None)  # torch 2.9+


def _register(layer: LoraLayer) -> None:
    layer.__dict__["routed_op_key"] = number = next(_NUMBERS)
    _LAYERS[number] = layer


def _add_routed_terms_(x: Tensor, out: Tensor, layer: int) -> None:
    """out += the routed adapters' terms of layer number `layer` for the routing it runs under now."""
    owner = _LAYERS.get(layer)
    routing = None if owner is None else owner.state.routing_now()
    if routing is None:
        raise LorakitError("a compiled routed layer ran with no routing or no longer exists; call it inside routed()")
    owner._refuse_merged_routing()  # read now, not traced: a merge after compiling is seen, and raises as itself
    summed = owner._routed(x, routing, out)
    if summed is not out:
        out.copy_(summed)


# Defined through torch.library's low-level API: torch.library.custom_op's Python wrappers (autograd, view and
# aliasing checks) cost 14.3 us a call on this project's CPU against 1.9 (benchmarks/routed_layer_cpu.py), once
# per routed layer of every step.
_LIBRARY = torch.library.Library("lorakit", "FRAGMENT")
_LIBRARY.define(
    "add_routed_terms_(Tensor x, Tensor(a!) out, int layer) -> ()",
    tags=(_UNSAFE_IN_GRAPHS,) if _UNSAFE_IN_GRAPHS else (),
)
_LIBRARY.impl("add_routed_terms_", _add_routed_terms_, "CompositeExplicitAutograd")
torch.library.register_fake("lorakit::add_routed_terms_", lambda x, out, layer: None, lib=_LIBRARY)


def _outside_graph(layer: LoraLayer) -> bool:
    """A routed call that the compiled graph leaves to the op: traced, in eval mode, recording no gradient, on a
    layer with a routed term of its own (not one that acts on the weight)."""
    return torch.compiler.is_compiling() and not (layer.training or torch.is_grad_enabled() or layer.acts_on_weight)


def _routed_outside_graph(layer: LoraLayer, x: Tensor, out: Tensor) -> Tensor:
    layer.state.gather_wanted = True  # a compiled model routes through this state: its tables are kept up to date
    table = plans.plan(layer._plan).table
    gathered = _gathered(x, out, layer.state, table)  # a decode step: in the graph itself
    if gathered is not None:
        return gathered
    if _UNSAFE_IN_GRAPHS is None:  # a CUDA graph would replay the op's recording: break the graph instead
        return _routed_eagerly(layer, x, out)
    torch.ops.lorakit.add_routed_terms_(x, out, layer.routed_op_key)
    return out


@torch.compiler.disable
def _routed_eagerly(layer: LoraLayer, x: Tensor, out: Tensor) -> Tensor:
    layer._refuse_merged_routing()
    return layer._routed(x, layer.state.routing_now(), out)


# -- routed decode steps that read each row's adapters in place ------------------------------------------
# A layer whose adapters are all plain LoRA of one dtype on a CUDA device keeps them in a table by number
# (ops.gathered). As a routed block starts without gradients, the tables are rebuilt if any adapter or layer
# changed since they were built (one comparison otherwise) and the routing's slots are put on the device. A decode
# step then adds its routed terms with two kernels that read the factors through the table: in a compiled model,
# inside the graph itself, so CUDA graphs replay the whole step and the host does nothing per routed layer (eagerly,
# the kept plans stay: they check every factor at every call). What the tables follow: factors changed in place
# (read where they are); adapters added, deleted, swapped in or out, merged, moved or given new attributes or
# factors, after which the tables are stale until the next routed block rebuilds them (a change inside a block: the
# compiled graph, guarding one flag, takes the op instead). Not seen: a factor's `.data` assigned directly.
GATHER_DEVICES = ("cuda",)
_TOKENS = itertools.count()  # AdapterState.gather_token


def _prepare_gathered(state: AdapterState, routing: Routing) -> None:
    if torch.compiler.is_compiling():  # a compiled LoraModel enters routed() itself
        _prepare_untraced(state, routing)
    else:  # eagerly without torch.compiler.disable's cost, at every routed call
        _prepare_where_wanted(state, routing)


def _prepare_where_wanted(state: AdapterState, routing: Routing) -> None:
    if not torch.is_grad_enabled() and _gather_devices_here():
        _prepare_now(state, routing)


_prepare_untraced = torch.compiler.disable(_prepare_where_wanted)  # device tensors made and kept: never traced


def _gather_devices_here() -> bool:
    devices = GATHER_DEVICES
    if devices not in _DEVICES_HERE:  # asked at every routed block: torch.cuda.is_available() costs a decode step
        _DEVICES_HERE[devices] = any(d != "cuda" or torch.cuda.is_available() for d in devices)
    return _DEVICES_HERE[devices]


_DEVICES_HERE: dict[tuple[str, ...], bool] = {}


def _prepare_now(state: AdapterState, routing: Routing) -> None:
    first = state.gather_owner != id(state)  # a deep copy builds its own
    broken = _broken_groups(state)
    if first or broken or not state.gather_fresh or (state.gather_wanted and not state.gather_built):
        # built at a state's first routed block (a model compiled after it traces them at once) and after a change
        # only where a compiled model has routed since: eager use would pay every adapter load for tables unread
        state.gather_owner = id(state)
        if first:
            state.gather_token = next(_TOKENS)
        state.gather_built = first or state.gather_wanted
        _build_tables(state, state.gather_built)
    if state.gather_device is not None:
        slots = routing.slots_for(state.gather_numbers, state.gather_device, state.gather_width)
        state.gather_slots = _held_slots(state, routing, slots)


ENTRY_HOOKS.append(_prepare_gathered)

# The slots a state's decode steps read, one tensor per shape, refilled only when the routing changes: a compiled
# step's CUDA graph reads it where it is (a static address), where each routing's own tensor would be copied into
# the graph at every replay, a launch of its own (its int32 does not join the token ids' copy).
_SLOTS_HELD: weakref.WeakKeyDictionary[AdapterState, dict] = weakref.WeakKeyDictionary()


def _held_slots(state: AdapterState, routing: Routing, slots: Tensor) -> Tensor:
    kept = routing._cache.get("held_slots")  # [the tensor, the slots it holds, id(state)]: a decode step repeating
    if kept is None or kept[1] is not slots or kept[2] != id(state):  # its routing copies nothing (a deep copy's own)
        held, form = _SLOTS_HELD.setdefault(state, {}), (slots.device, slots.dtype, slots.shape)
        kept = held.get(form)
        if kept is None:
            with torch.inference_mode(False):  # read by steps outside inference mode too, as the routing's own
                buffer = torch.empty_like(slots)
            torch._dynamo.mark_static_address(buffer)  # unguarded: a refill keeps the graphs; a new shape records
            kept = held[form] = [buffer, None, id(state)]
        if kept[1] is not slots:  # in stream order: the steps before this block read the routing they were given
            kept[0].copy_(slots)
            kept[1] = slots
        routing._cache["held_slots"] = kept
    return kept[0]


def _build_tables(state: AdapterState, wanted: bool) -> None:
    """Every layer of `state` gets its table afresh, written into its old one where that keeps compiled graphs; or,
    not wanted, none (what they kept alive is freed)."""
    numbers, devices = tuple(state.parents), set()
    layers = [layer for layer in list(_LAYERS.values()) if layer.state is state]
    wanted = wanted and not _sharded(layers)
    fresh = [layer._gather_table(numbers) if wanted else None for layer in layers]
    for layer, table in zip(layers, ops.gathered.restack([la._gather for la in layers], fresh), strict=True):
        layer._gather = table
        token = None if table is None else state.gather_token
        plans.set_plan(layer, token=token, no_dropout=table is not None and _draws_no_mask(layer))
        if table is not None:
            devices.add(table.entries.device)
    state.gather_numbers, state.gather_width = numbers, max(1, state.depth())
    state.gather_device = devices.pop() if len(devices) == 1 else None  # layers on several devices: not gathered
    _group_tables(state)
    tables_fresh(state)  # what there is (tables, or none) matches the adapters until the next change


def _sharded(layers: list[LoraLayer]) -> bool:
    """Whether FSDP2 shards the model (its factors DTensors outside a forward): then no layer gets a table, not even
    one whose factors are whole now (the root's, left gathered by the last forward: FSDP frees them later). FSDP2
    shards a module's parameters all alike, so each layer's first one tells (this runs at every adapter switch)."""
    firsts = (next(layer.adapters.parameters(), None) for layer in layers)
    return any(p is not None and not ops.gathered.whole(p) for p in firsts)


def _gathered_step(layer: LoraLayer, x: Tensor, plan: plans.Plan, state: AdapterState | None) -> Tensor | None:
    """A traced layer with a current table while its state's routed block runs (`state` from GATHERING, None
    otherwise): its output through the gathered path, or None where the usual path decides. Nothing here reads
    layer.state, so a compiled step guards the state once, not once a layer; nor the layer's table, a constant of
    its plan (a layer that acts on the weight has none)."""
    if state is None or not state.enabled or torch.is_grad_enabled() or _dropout_on(layer, plan):
        return None
    if plan.group is not None:
        return _siblings(layer, x, plan, state)
    base = layer._modules["base_layer"]
    state.gather_wanted = True  # as _routed_outside_graph
    if not _is_bare_linear(base):
        return _gathered(x, base(x), state, plan.table)
    table, weight = plan.table, base.weight  # as _gathered, with the base product made beside (traced: see _siblings)
    slots = _token_slots(state, x, table.n_in) if table is not None and state.gather_fresh else None
    if slots is None or weight.shape[0] != table.n_out:
        return None
    return _with_terms(x, [weight], [base.bias], slots, [table])[0]


def _gathered(x: Tensor, out: Tensor, state: AdapterState, table: ops.gathered.TableRef | None) -> Tensor | None:
    """out plus the routed terms through the layer's gathered table, or None where that path does not apply: no
    current table or slots, or more token rows than a decode step's. Traced only, where _outside_graph holds (eval
    mode, no gradient)."""
    if table is None or not state.gather_fresh:  # stale: a change since the routed block started
        return None
    slots = _token_slots(state, x, table.n_in)
    if slots is None or out.shape[-1] != table.n_out or not out.is_contiguous():
        return None
    tokens = slots.shape[0]
    summed = ops.add_gathered_lora(out.view(tokens, table.n_out), x.reshape(tokens, table.n_in), slots, table)
    return summed.view(out.shape)


def _token_slots(state: AdapterState, x: Tensor, n_in: int) -> Tensor | None:
    """Each token row's adapter numbers for a decode step's x through the tables, or None where the gathered path
    does not apply (no slots, another device, more token rows than a decode step's, rows not a batch's)."""
    slots = state.gather_slots
    if slots is None or x.dim() < 2 or x.shape[-1] != n_in or x.device != slots.device:
        return None
    tokens, rows = x.numel() // n_in, slots.shape[0]
    if x.shape[0] % rows or tokens > ops.gathered.MAX_TOKENS:
        return None
    each = tokens // rows  # row i of the batch is token rows i * each .. (Routing.rows_for)
    return slots if each == 1 else slots.repeat_interleave(each, dim=0)


# -- siblings in one gathered launch -------------------------------------------------------------
# q, k and v (gate and up) of a routed decode step take the same x, each with its own table. As the tables are built,
# siblings (lorakit.packed.SIBLINGS, by the paths the layers were injected at) whose tables are alike form a group;
# in a compiled decode step the first member called computes every member's output, its base products and one
# shrink and one expand for all (ops.add_gathered_lora_group), and leaves the others' in lorakit.packed.STASH, as
# the packed groups do. A member called with another input, or an output left untaken, marks the group broken, and
# the next routed block builds the tables with those layers apart.
_GROUPS_HELD: weakref.WeakKeyDictionary[AdapterState, dict] = weakref.WeakKeyDictionary()  # keys by paths, apart


def _held_groups(state: AdapterState) -> dict:
    """The state's group keys by member paths (kept: a rebuild with the same members compiles nothing) and the
    member paths found broken."""
    return _GROUPS_HELD.setdefault(state, {"keys": {}, "apart": set()})


def _group_tables(state: AdapterState) -> None:
    held = _held_groups(state)
    by_parent: dict[tuple, list] = {}
    for layer in list(_LAYERS.values()):
        if layer.state is not state:
            continue
        plans.set_plan(layer, group=None)
        table, path = layer._gather, layer.__dict__.get("path")
        if table is None or path is None:
            continue
        parent, _, leaf = path.rpartition(".")
        kin = packed.sibling_kin(leaf)
        if kin is not None:
            # ranks may differ (the widest tile serves all); a group draws its members' dropout alike or none
            alike = (table.entries.device, table.dtype, table.n_in, plans.of(layer).no_dropout)
            by_parent.setdefault((parent, kin, *alike), []).append((path, layer))
    groups = {}
    for members in by_parent.values():
        paths = tuple(path for path, _ in members)
        if not 2 <= len(members) <= 3 or paths in held["apart"]:
            continue
        key = held["keys"].get(paths)
        if key is None:
            key = held["keys"][paths] = packed.group_number()
        layers = [layer for _, layer in members]
        groups[key] = tuple(m._modules["base_layer"] for m in layers)
        refs = tuple(m._gather.ref for m in layers)  # constants of every member's plan
        for index, (_, layer) in enumerate(members):
            plans.set_plan(layer, group=(key, index, refs))
    state.gather_groups = groups


def _broken_groups(state: AdapterState) -> bool:
    """Whether a group of the state was found broken since its tables were built (its members then go apart)."""
    if packed.STASH.pending is not None:  # outputs the last step left untaken
        packed.BROKEN.add(packed.STASH.pending[0])
        packed.STASH.pending = None
    broken = packed.BROKEN and packed.BROKEN & state.gather_groups.keys()
    if broken:
        held = _held_groups(state)
        held["apart"].update(paths for paths, key in held["keys"].items() if key in broken)
        packed.BROKEN.difference_update(broken)
    return bool(broken)


def _draws_no_mask(layer: LoraLayer) -> bool:
    """No adapter of the layer has a dropout (Adapter makes an Identity for p = 0; a change of the module is a
    change the tables see): in training mode the gathered terms are then the same as in eval mode."""
    return all(type(a.dropout) is nn.Identity for a in layer.adapters.values())


def _dropout_on(layer: LoraLayer, plan: plans.Plan) -> bool:
    """Whether a dropout mask would be drawn. The training flag is read only where the plan has a dropout: a compiled
    step's guard on it, checked in every layer at every step, is then spared."""
    return not plan.no_dropout and layer.training


def _stashed(layer: LoraLayer, x: Tensor, plan: plans.Plan) -> bool:
    """Whether the group's first member, in this traced step, left this member's output for this same x (what it
    did only where the routed step's conditions held). Anything else is for _siblings to judge."""
    pending, group = packed.STASH.pending, plan.group
    return (
        torch.compiler.is_compiling()
        and pending is not None
        and pending[0] == group[0]
        and pending[1] is x
        and pending[2][group[1]] is not None
        and not (torch.is_grad_enabled() or _dropout_on(layer, plan))
    )


def _siblings(layer: LoraLayer, x: Tensor, plan: plans.Plan, state: AdapterState) -> Tensor | None:
    """This member's output: from the stash, or with every member's computed in one launch; None where the group
    cannot serve (stale tables, a member's base with hooks, not a decode step's x)."""
    state.gather_wanted = True  # as _routed_outside_graph: a compiled model routes through these tables
    key, index, tables = plan.group
    y = _taken(x, (key, index, None))
    if y is not None:
        return y
    members = state.gather_groups.get(key)
    if members is None or not state.gather_fresh:
        return None
    # this member's own base, not the group's reference to it: no second source for its weight in the graph
    bases = [layer._modules["base_layer"] if i == index else b for i, b in enumerate(members)]
    slots = _token_slots(state, x, tables[index].n_in)
    if slots is None or not all(_is_bare_linear(b) for b in bases):
        return None
    weights = [b.weight for b in bases]  # traced only: nn.Linear's own reads, guarded as its forward's would be
    if any(w.shape[0] != t.n_out for w, t in zip(weights, tables, strict=True)):
        return None
    biases = [b.bias for b in bases]
    outs = _with_terms(x, weights, biases, slots, tables)
    packed.STASH.pending = (key, x, _others(outs, index))
    return outs[index]


def _with_terms(x: Tensor, weights: list, biases: list, slots: Tensor, tables: list) -> list[Tensor]:
    """Each member's base product plus its routed terms (ops.gathered_linear_group: on a GPU the terms are made
    beside the base products), summed by a pointwise op of the graph that the compiler can put into the kernel
    that reads the output next; rounded once, as the terms added in place are."""
    outs, terms = ops.gathered_linear_group(x.reshape(-1, x.shape[-1]), weights, biases, slots, tables)
    return [(o + t).to(o.dtype).view(*x.shape[:-1], o.shape[-1]) for o, t in zip(outs, terms, strict=True)]


def _one_token_a_row(key: tuple) -> bool:
    """A routed plan's key: a call that records no gradient with one position per row (a decode step)."""
    return not key[-2] and math.prod(key[0][1:]) == 1


def _dense_takes(x: Tensor, summed_rank: int) -> bool:
    """Whether a decode step of x over adapters of that summed rank runs as routed_dense's three ops, where
    adapters without rows cost no more than zero columns."""
    tokens = x.numel() // x.shape[-1] if x.dim() else 0
    return x.device.type in routed_dense.DEVICES and tokens * summed_rank <= routed_dense.DENSE_MAX


_NO_ROWS: dict[torch.device, Tensor] = {}


def _rows(routing: Routing, x: Tensor) -> dict[str, Tensor]:
    """Each routed adapter's rows of x; an adapter the routing does not name has none."""
    rows, _ = routing.rows_for(x.shape[0], x.device)
    if x.device not in _NO_ROWS:
        with torch.inference_mode(False):
            _NO_ROWS[x.device] = torch.zeros(0, dtype=torch.long, device=x.device)
    return defaultdict(lambda: _NO_ROWS[x.device], rows)


def _marks(adapters: list[Adapter]) -> list[tuple]:
    """What of each adapter, besides its factors' contents, decides its routed term (read from the instance dicts:
    nn.Module's attribute lookup is slow, and a missing name, such as nn.Identity's p, raises inside it). Tensors by
    id: the plan holds its factors, so their ids are not reused while it compares them."""
    marks = []
    for a in adapters:
        own = a.__dict__
        dropout = own["_modules"].get("dropout")
        p = dropout.__dict__.get("p") if dropout is not None else None
        tensors = (*map(id, own["_parameters"].values()), *map(id, own["_buffers"].values()))  # a factor replaced
        marks.append((own["scale"], own["variant"], tensors, dropout, p))
    return marks


def _stamp(tensors: list[Tensor]) -> list[int]:
    """The factors' in-place change counters and storages, read without a copy (map over C getters: a decode step
    of 64 routed adapters reads some 14,000 of them)."""
    try:
        versions = list(map(_VERSION, tensors))
    except RuntimeError:  # an inference tensor has no counter (nothing outside inference mode changes it in place)
        versions = [-1 if t.is_inference() else t._version for t in tensors]
    return versions + list(map(Tensor.data_ptr, tensors))


_VERSION = operator.attrgetter("_version")


_UNROUTABLE = (
    "target_parameters adapters change the weight itself, which every row shares, so they cannot be routed per "
    "row; serve them with set_adapter() (one adapter for the whole batch) or merge them"
)


def _reads_pack(layer: LoraLayer, fast: tuple, args: tuple, kwargs: dict) -> bool:
    """A compiled inference step of a layer with offsets (its base a bare linear, _packed_linear): the graph reads
    the views of lorakit.packed's buffer, one input for the model instead of two a layer. Eagerly the factors
    themselves (and their kept casts) serve. In training mode the adapter's dropout applies, so a layer whose
    dropout is on takes the factors then."""
    return (
        torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() or args or kwargs)
        and not (fast[4] and layer.training)
    )


def _wants_pack(layer: LoraLayer, base: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> bool:
    """A compiled inference step of a bare linear layer on a device that gets packs, not asked for yet."""
    return (
        torch.compiler.is_compiling()
        and not (layer.training or torch.is_grad_enabled() or args or kwargs)
        and x.device.type in packed.PACK_DEVICES
        and layer.state.enabled
        and not layer.state.pack_wanted
        and _is_bare_linear(base)
    )


def _packed_linear(layer: LoraLayer, x: Tensor, fast: tuple) -> Tensor | None:
    """base(x) + s B (A x) with A and B read from the buffer at the layer's offsets (eval mode: no dropout); a
    member of a group of siblings gets its output from the group's one launch (_grouped). None where the base is
    not a bare linear. A member served from the stash reads nothing of its own (the group's first member read its
    base and offsets), so no module is reached twice in the graph and none needs an aliasing guard."""
    number, a_span, b_span, scale, _, group = fast
    if group is not None:
        y = _taken(x, group)
        if y is not None:
            return y
    base = layer._modules["base_layer"]
    if not _is_bare_linear(base):
        return None
    if group is not None:
        y = _grouped(x, base, group)
        if y is not None:
            return y
    factors = [ops.LoraFactors(*_views(number, a_span, b_span), scale, 0.0)]
    return ops.lora_linear(x, base.weight, base.bias, factors, False)  # traced only, as _siblings


def _stacked_a(spans: tuple) -> Tensor | None:
    """The members' A as one view of their buffer, where they lie there back to back (lorakit.packed puts them so),
    else None. Decided from the offsets, constants of the graph: nothing of the buffer is read to know it."""
    number, (at, _, cols) = spans[0][0], spans[0][1]
    end = at
    for buf, (a_at, a_rows, a_cols), _, _ in spans:
        if buf != number or a_at != end or a_cols != cols:
            return None
        end = a_at + a_rows * a_cols
    return packed.BUFFERS[number][at:end].view(-1, cols)


def _views(number: int, a_span: tuple, b_span: tuple) -> tuple[Tensor, Tensor]:
    """A and B as views of buffer `number` at their spans (offset, rows, columns)."""
    buffer = packed.BUFFERS[number]
    (a_at, a_rows, a_cols), (b_at, b_rows, b_cols) = a_span, b_span
    lora_a = buffer[a_at : a_at + a_rows * a_cols].view(a_rows, a_cols)
    return lora_a, buffer[b_at : b_at + b_rows * b_cols].view(b_rows, b_cols)


def _taken(x: Tensor, group: tuple) -> Tensor | None:
    """This member's output where its group's first member, called with this same x, left it in the stash. Runs
    only while a step is traced: "the same x" is the traced tensor itself, so the graph carries no check of it. A
    stash left untaken when another member runs, or a member called with another input, marks its group broken
    (lorakit.packed: the next pack leaves those layers apart)."""
    number, index, _ = group
    pending = packed.STASH.pending
    if pending is None:
        return None
    if pending[0] == number and pending[1] is x and pending[2][index] is not None:
        outs = pending[2]
        rest = _others(outs, index)
        packed.STASH.pending = None if all(y is None for y in rest) else (number, x, rest)
        return outs[index]
    packed.BROKEN.add(pending[0])  # its other members did not follow with its input
    packed.STASH.pending = None
    return None


def _grouped(x: Tensor, base: nn.Module, group: tuple) -> Tensor | None:
    """All members' outputs for x in one op (ops.lora_linear_group), this member's returned and the others' left
    in the stash; None where the group cannot serve (a member's base with hooks, a member's dropout drawn)."""
    number, index, spans = group
    held = packed.GROUPS.get(number)
    if held is None:
        return None
    member_bases, dropouts = held
    bases = [base if i == index else b for i, b in enumerate(member_bases)]  # this member's own: no second source
    if not all(_is_bare_linear(b) for b in bases) or (dropouts and any(d is not None and d.training for d in dropouts)):
        return None
    parts = [
        (b.weight, b.bias, ops.LoraFactors(*_views(buf, a_span, b_span), scale, 0.0))
        for b, (buf, a_span, b_span, scale) in zip(bases, spans, strict=True)
    ]
    outs = ops.lora_linear_group(x, parts, False, _stacked_a(spans))
    packed.STASH.pending = (number, x, _others(outs, index))
    return outs[index]


def _others(outs, index: int) -> tuple:
    """The outputs still to be taken: all but `index`'s (None there)."""
    return tuple(None if i == index else y for i, y in enumerate(outs))


def _plain_factors(adapter: Adapter) -> ops.LoraFactors | None:
    """The adapter as the ops take it, when its contribution is exactly plain LoRA's on a matmul kind. Its tensors
    and dropout are read from the module's own dicts: nn.Module's attribute lookup (~1 us a name) on every adapter
    of every layer was most of a routed decode step's Python time."""
    if not adapter.plain:
        return None
    if adapter._parameters.get("lora_B_bias") is not None:  # the ops take factors only
        return None
    dropout = adapter._modules.get("dropout")
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return ops.LoraFactors(_tensor(adapter, "lora_A"), _tensor(adapter, "lora_B"), adapter.scale, p)


def _tensor(module: nn.Module, name: str) -> Tensor:
    """module.<name>, looked up where nn.Module keeps it (a parameter, even None, else a buffer, else a plain
    attribute)."""
    params = module._parameters
    if name in params:
        return params[name]
    found = module._buffers.get(name)
    return getattr(module, name) if found is None else found


def _sum_dtype(out: Tensor, adapters: list[Adapter], factors: list[ops.LoraFactors | None]) -> torch.dtype:
    """The dtype the terms are summed in before one rounding: the widest of the output and the adapters' (plain
    LoRA's is lora_B's, read from its factors)."""
    dtype = out.dtype
    for other in {adapter.dtype if f is None else f.lora_B.dtype for adapter, f in zip(adapters, factors, strict=True)}:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _is_bare_linear(module: nn.Module) -> bool:
    """nn.Linear itself with no hook to call, its own or global (nn.Module's own test for skipping them): its forward
    is F.linear(x, W, b), so lora_linear can compute it whole."""
    return type(module) is nn.Linear and not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _global_forward_hooks
        or _global_forward_pre_hooks
        or _global_backward_hooks
        or _global_backward_pre_hooks
    )


class _WeightDelta(nn.Module):
    """Parametrization W -> W + sum dW of the owning layer's live adapters."""

    def __init__(self, layer: LoraLayer) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the layer already owns this module (no cycle in state_dict)
        self.__dict__["layer"] = layer

    def forward(self, weight: Tensor) -> Tensor:
        for adapter in self.layer.live_adapters():
            weight = weight + adapter.delta_weight().to(weight.dtype)
        return weight
