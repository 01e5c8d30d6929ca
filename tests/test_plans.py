"""lorakit.plans: a layer's constants for a compiled step under one interned number."""

from __future__ import annotations

import torch

from lorakit import plans


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._plan = plans.EMPTY


def test_equal_plans_share_a_number_so_a_switch_back_finds_the_old_one():
    layer, other = _Layer(), _Layer()
    plans.set_plan(layer, token=7, fast=(1, (0, 4, 8), (64, 8, 4), 2.0, 0.0, None))
    first = layer._plan
    plans.set_plan(other, token=7, fast=(1, (0, 4, 8), (64, 8, 4), 2.0, 0.0, None))
    assert other._plan == first != plans.EMPTY
    plans.set_plan(layer, token=8)
    assert layer._plan != first and plans.of(layer).token == 8 and plans.of(layer).fast == plans.of(other).fast
    plans.set_plan(layer, token=7)
    assert layer._plan == first
    plans.set_plan(layer, token=None, fast=None)
    assert layer._plan == plans.EMPTY and plans.of(layer) == plans.Plan()


def test_forgotten_plans_are_those_no_layer_holds_and_their_numbers_never_return(monkeypatch):
    monkeypatch.setattr(plans, "KEPT", 0)
    held = _Layer()
    plans.set_plan(held, token=1000)
    kept = held._plan
    churn = _Layer()
    seen = set()
    for token in range(1001, 1050):  # each new plan past KEPT drops the unheld ones
        plans.set_plan(churn, token=token)
        seen.add(churn._plan)
    assert plans.of(held).token == 1000 and held._plan == kept  # a held plan stays
    assert len(seen) == 49 and kept not in seen
    plans.set_plan(churn, token=1001)  # an equal plan after its number was dropped: a new number, not an old one
    assert churn._plan > max(seen)


def test_a_compiled_function_reads_a_plan_as_constants():
    """The plan's contents are constants of the graph: only the number is guarded, and a new number compiles again
    with the new contents."""
    layer = _Layer()
    plans.set_plan(layer, token=3)
    compiles = []

    def backend(gm, _):
        compiles.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def scaled(x, module):
        return x * plans.plan(module._plan).token

    x = torch.ones(2)
    assert torch.equal(scaled(x, layer), 3 * x) and torch.equal(scaled(x, layer), 3 * x)
    assert len(compiles) == 1
    plans.set_plan(layer, token=5)
    assert torch.equal(scaled(x, layer), 5 * x) and len(compiles) == 2
