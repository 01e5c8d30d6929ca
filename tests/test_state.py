"""AdapterState: one object the model owns and every layer reads; the tree, active vs trainable, routing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraLayer, get_lora_model
from lorakit.adapter import Adapter
from lorakit.kinds import Kind
from lorakit.saved import SavedModule
from lorakit.state import BASE, AdapterState
from lorakit.variants import get_variant
from tests.cases import conv_mlp


def _tree() -> AdapterState:
    state = AdapterState()
    state.add("legal")
    state.add("contracts", parent="legal")
    state.add("leases", parent="contracts")
    state.add("medical")
    return state


def test_path_runs_from_the_root_and_paths_keep_each_name_once():
    state = _tree()
    assert state.path("leases") == ["legal", "contracts", "leases"]
    assert state.paths(["leases", "contracts", "medical"]) == ["legal", "contracts", "leases", "medical"]
    assert state.children("legal") == ["contracts"]


def test_activating_a_node_activates_its_path_and_trains_only_the_node():
    state = _tree()
    state.activate(["contracts"])
    assert state.active == ["legal", "contracts"] and state.trainable == {"contracts"}
    assert state.live(["contracts", "legal", "medical"]) == ["legal", "contracts"]
    state.enabled = False
    assert state.live(["contracts", "legal"]) == []


def test_bad_tree_edits_are_refused_and_change_nothing():
    state = _tree()
    before = dict(state.parents)
    with pytest.raises(LorakitError, match=r"parent 'nope' is not a loaded adapter; loaded: \['contracts'"):
        state.add("x", parent="nope")
    with pytest.raises(LorakitError, match="own parent"):
        state.add("x", parent="x")
    with pytest.raises(LorakitError, match=r"parent of \['contracts'\]"):
        state.remove("legal")
    with pytest.raises(LorakitError, match="exists already"):
        state.add("legal")
    assert state.parents == before


def test_routing_lists_every_row_under_every_adapter_of_its_path():
    state = _tree()
    routing = state.routing_for(["leases", "__base__", "medical", "contracts", "leases"])
    rows = {name: idx.tolist() for name, idx in routing.rows.items()}
    assert rows == {"legal": [0, 3, 4], "contracts": [0, 3, 4], "leases": [0, 4], "medical": [2]}
    groups = {path: idx.tolist() for path, idx in routing.groups.items()}
    assert groups[()] == [1] and groups[("legal", "contracts", "leases")] == [0, 4]


def test_routing_expands_repeated_rows_and_refuses_a_row_count_that_does_not_divide():
    routing = _tree().routing_for(["medical", "legal"])
    rows, _ = routing.rows_for(6, torch.device("cpu"))  # each row repeated 3 times in place (beams)
    assert rows["medical"].tolist() == [0, 1, 2] and rows["legal"].tolist() == [3, 4, 5]
    with pytest.raises(LorakitError, match="got 5 rows but adapter_names has 2 entries"):
        routing.rows_for(5, torch.device("cpu"))


def test_routed_is_cleared_on_exceptions_and_does_not_nest():
    state = _tree()
    routing = state.routing_for(["legal"])
    with pytest.raises(KeyError), state.routed(routing):
        raise KeyError("inside")
    assert state.routing is None
    with state.routed(routing), pytest.raises(LorakitError, match="do not nest"), state.routed(routing):
        pass
    assert state.routing is None


def test_every_layer_and_saved_module_reads_the_models_one_state():
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1", "conv1"], modules_to_save=["head"]))
    model.add_adapter("b", LoraConfig(target_modules=["emb", "lin2"]))  # wraps new layers after the first adapter
    hosts = [m for m in model.modules() if isinstance(m, (LoraLayer, SavedModule))]
    assert len(hosts) == 5 and all(m.state is model.state for m in hosts)
    twin = copy.deepcopy(model)  # a copy shares one state of its own
    twin_hosts = [m for m in twin.modules() if isinstance(m, (LoraLayer, SavedModule))]
    assert all(m.state is twin.state for m in twin_hosts) and twin.state is not model.state
    twin.set_adapter("b")
    assert model.active_adapters == ["default"] and twin.active_adapters == ["b"]


def test_a_layer_without_a_model_works_with_its_own_state():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoraLayer(base, Kind())
    adapter = Adapter(Kind(), base.weight, 2, 4.0, 2.0, 0.0, get_variant("lora"), init=False)
    layer.add_adapter("only", adapter)
    x = torch.randn(3, 6)
    expected = base(x) + 2.0 * x @ adapter.lora_A.T @ adapter.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.active_adapters == ["only"]


def test_routing_spans_are_ranges_only_where_every_adapter_has_consecutive_rows_of_its_own():
    state = AdapterState()
    for name in ("a", "b"):
        state.add(name)
    state.add("c", parent="a")
    assert state.routing_for(["a", "a", BASE, "b", "b", "b"]).spans_for(6) == {"a": (0, 2), "b": (3, 6)}
    # a layer that flattens (batch, seq) into rows repeats each row k times
    assert state.routing_for(["b", "a", "a"]).spans_for(6) == {"b": (0, 2), "a": (2, 6)}
    assert state.routing_for(["a", "b", "a"]).spans_for(3) is None  # a's rows are not consecutive
    assert state.routing_for(["a", "c"]).spans_for(2) is None  # row 1 is under a and c (a tree path)
    assert state.routing_for(["a", "b"]).spans_for(3) is None  # 3 rows are no repeat of 2


def test_routing_slots_name_each_rows_adapters_by_number():
    """What the gathered decode kernels read: row i's path as numbers in the given order, -1 past its end."""
    state = _tree()
    routing = state.routing_for(["leases", BASE, "medical", "legal"])
    numbers = ("medical", "legal", "contracts", "leases")
    slots = routing.slots_for(numbers, torch.device("cpu"))
    assert slots.dtype == torch.int32 and slots.shape == (4, 3)
    assert [sorted(numbers[g] for g in row if g >= 0) for row in slots.tolist()] == [
        ["contracts", "leases", "legal"], [], ["medical"], ["legal"]
    ]  # fmt: skip
    assert routing.slots_for(numbers, torch.device("cpu")) is slots  # kept: a decode loop asks every step
    flat = state.routing_for(["medical", BASE]).slots_for(numbers, torch.device("cpu"), width=state.depth())
    assert flat.tolist() == [[0, -1, -1], [-1, -1, -1]]  # the tree's depth: one shape for every routing
    other = routing.slots_for(numbers[::-1], torch.device("cpu"))  # another numbering: slots of its own
    assert other.tolist() == [[3 - g if g >= 0 else -1 for g in row] for row in slots.tolist()]
