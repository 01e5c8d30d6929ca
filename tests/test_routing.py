"""Mixed-adapter batches: row i of model(x, adapter_names=names) equals the model with only names[i] active."""

from __future__ import annotations

import copy
import re
from functools import partial

import peft
import pytest
import torch

from lorakit import LoraConfig, LorakitError, LoraModel, VeraConfig, get_lora_model
from lorakit.layer import LoraLayer
from lorakit.state import ROUTINGS_KEPT
from tests.cases import conv_mlp, mlp, output, tiny_gpt2, tiny_llama

NAMES = ["a", "b", "__base__", "a", "b"]


def _ids(vocab: int, rows: int = len(NAMES), length: int = 7) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


def _model(build, config_a, config_b) -> LoraModel:
    torch.manual_seed(3)
    model = get_lora_model(build(), config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    return model.eval()


def _one_at_a_time(model: LoraModel, call, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(call()[i])
        else:
            model.set_adapter(name)
            rows.append(call()[i])
    return torch.stack(rows)


def _check_rows(model: LoraModel, inputs: dict, names: list[str] = NAMES) -> None:
    with torch.no_grad():
        mixed = output(model(**inputs, adapter_names=names))
        expected = _one_at_a_time(model, lambda: output(model(**inputs)), names)
        base = _one_at_a_time(model, lambda: output(model(**inputs)), ["__base__"] * len(names))
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    for i, name in enumerate(names):  # a check that can fail: the adapters do change their rows
        assert torch.allclose(mixed[i], base[i]) == (name == "__base__"), i


KINDS = {
    # every kind at once, ranks 4 and 2, different target sets, a modules_to_save head for one adapter only
    "embedding-conv-linear": (
        conv_mlp,
        lambda: {"ids": _ids(20)},
        LoraConfig(
            r=4, init_lora_weights=False, target_modules=["emb", "conv1", "conv2", "lin1"], modules_to_save=["head"]
        ),
        LoraConfig(r=2, init_lora_weights=False, target_modules=["conv2", "lin1", "lin2"]),
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        lambda: {"input_ids": _ids(64)},
        LoraConfig(r=4, init_lora_weights=False, target_modules=["c_attn", "c_fc"]),
        LoraConfig(r=8, init_lora_weights=False, target_modules=["c_attn", "c_proj", "wte"]),
    ),
    "dora-and-rslora": (
        conv_mlp,
        lambda: {"ids": _ids(20)},
        LoraConfig(r=4, init_lora_weights=False, use_dora=True, target_modules=["emb", "conv1", "lin1", "lin2"]),
        LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, use_rslora=True, target_modules=["lin1", "conv2"]),
    ),
    "vera-and-lora": (
        tiny_llama,
        lambda: {"input_ids": _ids(64)},
        VeraConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "o_proj", "down_proj"]),
    ),
    "lora-fa-and-delta-lora": (
        tiny_llama,
        lambda: {"input_ids": _ids(64)},
        LoraConfig(r=4, init_lora_weights=False, variant="lora_fa", target_modules=["q_proj", "up_proj"]),
        LoraConfig(r=2, init_lora_weights=False, variant="delta_lora", target_modules=["v_proj", "up_proj"]),
    ),
}


@pytest.mark.parametrize("case", KINDS, ids=str)
def test_each_row_equals_its_adapter_alone(case):
    build, inputs, config_a, config_b = KINDS[case]
    _check_rows(_model(build, config_a, config_b), inputs())


def test_rows_equal_peft_adapter_names(tmp_path):
    model = _model(
        tiny_llama,
        LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["k_proj", "v_proj", "up_proj"]),
    )
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    ids = _ids(64)
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=NAMES).logits
        torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expand", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams"])
def test_generate_routes_each_row_and_its_beams(expand):
    model = _model(
        tiny_llama,
        LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, init_lora_weights=False, target_modules=["o_proj", "gate_proj"]),
    )
    names, ids = ["b", "__base__", "a"], _ids(64, rows=3, length=4)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, **expand}
    k = expand.get("num_return_sequences", 1)
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
        rows = mixed[i * k : (i + 1) * k]
        assert torch.equal(rows[:, : alone.shape[1]], alone), name
        assert (rows[:, alone.shape[1] :] == 0).all(), name  # a row that stopped early is padded


@pytest.mark.parametrize("names", [["a", "b", "b", "a"], ["b", "b", "a", "a"]], ids=["interleaved", "ranges"])
def test_training_on_a_mixed_batch_gives_each_adapter_its_own_rows_gradient(names, monkeypatch):
    """Consecutive rows per adapter (parallel training's layout) go through views of x, interleaved rows through
    the row lists: the same gradients either way."""
    from lorakit import ops

    spanned, add_spanned_lora = [], ops.add_spanned_lora
    monkeypatch.setattr(ops, "add_spanned_lora", lambda *a, **k: spanned.append(1) or add_spanned_lora(*a, **k))
    model = _model(
        mlp,
        LoraConfig(r=2, init_lora_weights=False, target_modules=["lin0", "lin1"]),
        LoraConfig(r=3, init_lora_weights=False, target_modules=["lin1"]),
    ).train()
    model.set_adapter(["a", "b"])  # both trainable; routing, not the active set, decides which rows use which
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    model(x=x, adapter_names=names).pow(2).sum().backward()
    assert len(spanned) == (2 if names[0] == "b" else 0)  # lin0 and lin1
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        model(x=x[rows]).pow(2).sum().backward()
    model.set_adapter(["a", "b"])
    for name, grad in mixed.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-6, rtol=1e-5)


def _llama_grads(checkpointing: dict | None, names: list[str], calls: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of each adapter's factors after model(ids, adapter_names=names) and one backward outside the call;
    with checkpointing (its kwargs), the forward runs again in backward, after the routing block has ended."""
    model = _model(
        tiny_llama,
        LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]),
        LoraConfig(r=3, init_lora_weights=False, target_modules=["q_proj", "up_proj"]),
    ).train()
    model.set_adapter(["a", "b"])  # both train; the active set alone would put both on every row
    if checkpointing is not None:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    ids = _ids(64, rows=len(names))
    loss = sum(
        output(model(input_ids=ids[i::calls], adapter_names=names[i::calls])).float().pow(2).mean()
        for i in range(calls)
    )
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recomputes_each_row_with_its_own_adapter(reentrant):
    names = ["a", "b", "__base__", "b"]
    plain = _llama_grads(None, names)
    checkpointed = _llama_grads({"use_reentrant": reentrant}, names)
    assert plain.keys() == checkpointed.keys() and len(plain) == 20
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5)


def test_one_backward_through_two_routed_forwards_with_checkpointing_is_refused():
    names = ["a", "b", "b", "a"]
    _llama_grads(None, names, calls=2)  # without checkpointing nothing is recomputed, so it stays allowed
    with pytest.raises(LorakitError, match="once per routed forward"):
        _llama_grads({"use_reentrant": False}, names, calls=2)


def test_a_routed_backward_leaves_the_model_compilable_in_one_graph():
    model = _two_adapter_mlp().train()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    model(x=x, adapter_names=["a", "b", "b", "a"]).sum().backward()  # leaves the mark for its recomputes
    compiled = torch.compile(model.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x=x), model.model(x=x))


# -- bad input ---------------------------------------------------------------------------------------
def _two_adapter_mlp() -> LoraModel:
    return _model(
        mlp,
        LoraConfig(r=2, init_lora_weights=False, target_modules=["lin0"]),
        LoraConfig(r=2, init_lora_weights=False, target_modules=["lin1"]),
    )


def test_unknown_name_lists_the_loaded_ones_and_changes_nothing():
    model = _two_adapter_mlp()
    with pytest.raises(LorakitError, match=r"unknown adapter\(s\) \['c'\]; loaded: \['a', 'b'\]"):
        model(torch.randn(2, 6), adapter_names=["a", "c"])
    assert model.state.routing is None and model.active_adapters == ["a"]


def test_row_count_must_match_the_batch():
    model = _two_adapter_mlp()
    with pytest.raises(LorakitError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(torch.randn(2, 6), adapter_names=["a", "b", "a"])
    with pytest.raises(LorakitError, match="a list of adapter names, one per row"):
        model(torch.randn(2, 6), adapter_names="a")
    model(torch.randn(2, 6), adapter_names=["a", "b"])  # kept: the next checks must not pass through the cache
    for bad in (["a", 3], [["a"], "b"], 5, ["a", None]):
        with pytest.raises(LorakitError, match="a list of adapter names, one per row"):
            model(torch.randn(2, 6), adapter_names=bad)
    assert model.state.routing is None


def test_an_adapter_that_cannot_be_routed_is_refused_on_every_call_not_only_the_first():
    model = get_lora_model(mlp(), LoraConfig(r=2, init_lora_weights=False, target_modules=["lin1"]), "a")
    model.add_adapter("w", LoraConfig(target_parameters=["lin0.weight"]))
    for _ in range(2):
        with pytest.raises(LorakitError, match=r"adapters \['w'\] use target_parameters"):
            model(torch.randn(2, 6), adapter_names=["a", "w"])


def test_routing_is_cleared_when_the_forward_raises():
    model = _two_adapter_mlp()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5), adapter_names=["a", "b"])  # wrong width: the base layer raises
    assert model.state.routing is None
    torch.testing.assert_close(model(torch.ones(1, 6)), model(torch.ones(1, 6), adapter_names=["a"]))


def test_target_parameters_adapters_cannot_be_routed():
    model = get_lora_model(mlp(), LoraConfig(target_parameters=["lin0.weight"]), adapter_name="p")
    with pytest.raises(LorakitError, match="target_parameters.*cannot be routed per row"):
        model(torch.randn(2, 6), adapter_names=["p", "__base__"])


def test_merged_adapters_must_be_unmerged_before_routing():
    model = _two_adapter_mlp()
    model.merge_adapter()
    with pytest.raises(LorakitError, match="unmerge_adapter"):
        model(torch.randn(2, 6), adapter_names=["a", "b"])


# -- what is reused between routed calls -------------------------------------------------------------
EVEN = ["a", "b", "c", "b", "c", "a"]  # three adapters of one rank: one batched level
UNEVEN = ["a", "a", "a", "b", "__base__", "c"]  # padded
WHOLE = ["b"] * 6  # one adapter on every row
PART = ["__base__", "b", "__base__", "__base__", "b", "__base__"]  # one adapter on some rows: gathered


def _three_adapter_mlp() -> LoraModel:
    torch.manual_seed(3)
    model = get_lora_model(mlp(), _CONFIG, adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, _CONFIG)
    return model.eval()


_CONFIG = LoraConfig(r=2, init_lora_weights=False, target_modules=["lin0", "lin1"])


def _adapters(model: LoraModel, name: str) -> list:
    return [m.adapters[name] for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters]


def _double_scale(model: LoraModel) -> None:
    for adapter in _adapters(model, "b"):
        adapter.scale *= 2  # as a slot folds its scale


def _scale_factor_in_place(model: LoraModel) -> None:
    with torch.no_grad():
        for adapter in _adapters(model, "b"):
            adapter.lora_B.mul_(-3)


def _replace_factor(model: LoraModel) -> None:
    for adapter in _adapters(model, "b"):
        adapter.lora_A = torch.nn.Parameter(adapter.lora_A.detach() + 1)


def _readd(model: LoraModel) -> None:
    model.delete_adapter("b")
    torch.manual_seed(11)
    model.add_adapter("b", _CONFIG)  # same name, other random factors


def _hotswap(model: LoraModel, tmp_path) -> None:
    torch.manual_seed(12)
    get_lora_model(mlp(), _CONFIG).save_pretrained(tmp_path / "other")
    model.hotswap_adapter(tmp_path / "other", "b")


def _assign_data(model: LoraModel) -> None:
    for adapter in _adapters(model, "b"):
        adapter.lora_B.data = adapter.lora_B.data * -3  # same tensor object, same version counter, new storage


def _swap_module(model: LoraModel) -> None:
    """Another Adapter object under the same name, put into the layers' dicts directly (not through add_adapter)."""
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        other = copy.deepcopy(layer.adapters["b"])
        with torch.no_grad():
            other.lora_B.mul_(-3)
        layer.adapters["b"] = other


CHANGES = {
    "scale": _double_scale,
    "module-swapped": _swap_module,
    "data-assigned": _assign_data,
    "factor-in-place": _scale_factor_in_place,
    "factor-replaced": _replace_factor,
    "deleted-and-readded": _readd,
    "hotswap": _hotswap,
    "to-float64": lambda model: model.double(),
}


def _dense_everywhere(monkeypatch) -> None:
    """The layers' prepared op is CUDA decoding's dense one (routed_dense) on the CPU too, whenever it applies."""
    from lorakit.ops import routed_dense

    monkeypatch.setattr(routed_dense, "DEVICES", ("cpu", "cuda"))


@pytest.mark.parametrize("op", ["portable", "dense"])
def test_what_routed_calls_kept_of_a_deleted_adapter_is_freed_with_it(op, monkeypatch):
    """A server loads and unloads adapters for days: the stacks, side-by-side copies and plans its routed calls
    kept must go with the adapter, not linger until the op caches fill up (thousands of entries, 512 MiB each)."""
    import gc
    import weakref

    from lorakit.ops import routed, routed_dense

    if op == "dense":
        _dense_everywhere(monkeypatch)
    caches = (routed._STACKS, routed._PLANS, routed_dense._FACTORS, routed_dense._MASKS)
    model, x = _three_adapter_mlp(), torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    sizes, factors = None, []
    for i in range(8):
        model.add_adapter(f"new{i}", _CONFIG)
        factors += [weakref.ref(a.lora_A) for a in _adapters(model, f"new{i}")]
        with torch.inference_mode():
            for names in (["a", f"new{i}", "b"] * 2, [f"new{i}"] * 6, [f"new{i}", "c"] * 3):
                model(x=x, adapter_names=names)
        model.delete_adapter(f"new{i}")
        sizes = sizes or [len(c) for c in caches]  # after the first cycle: what the kept adapters' calls hold
        assert [len(c) for c in caches] == sizes
    gc.collect()
    assert not any(ref() is not None for ref in factors)
    assert routed._STACKS.nbytes == sum(t.nbytes for _, value in routed._STACKS.values() for t in value)


@pytest.mark.parametrize("op", ["portable", "dense"])
@pytest.mark.parametrize("names", [EVEN, UNEVEN, WHOLE], ids=["even", "uneven", "whole-batch"])
@pytest.mark.parametrize("change", CHANGES, ids=str)
def test_a_repeated_routed_call_sees_every_change_of_its_adapters(change, names, op, tmp_path, monkeypatch):
    if op == "dense":
        _dense_everywhere(monkeypatch)
    model = _three_adapter_mlp()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = [model(x=x, adapter_names=names) for _ in range(2)]  # the second call reuses what the first built
    changed = CHANGES[change]
    changed(model, tmp_path) if change == "hotswap" else changed(model)
    x = x.to(next(model.parameters()).dtype)
    with torch.inference_mode():
        mixed = model(x=x, adapter_names=names)
        expected = _one_at_a_time(model, lambda: model(x=x), names)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    row = names.index("b")
    assert mixed.dtype == x.dtype
    assert (change == "to-float64") == torch.allclose(mixed[row].float(), before[1][row])  # b's row changed


@pytest.mark.parametrize("op", ["portable", "dense"])
def test_rows_joining_and_leaving_reuse_a_plan_of_the_same_adapters_for_their_own_rows(op, monkeypatch):
    if op == "dense":
        _dense_everywhere(monkeypatch)
    model = _three_adapter_mlp()
    generator = torch.Generator().manual_seed(0)
    batches = [EVEN, ["a", "b", "c", "c", "a"], ["a", "a", "b", "c", "b", "c", "__base__"], EVEN, ["b", "__base__"],
               ["c", "a"], ["a"], ["b", "b", "a"]]  # fmt: skip
    for step, names in enumerate(batches * 2):  # the second round after b's factors changed in place
        if step == len(batches):
            _scale_factor_in_place(model)
        x = torch.randn(len(names), 6, generator=generator)
        with torch.inference_mode():
            mixed = model(x=x, adapter_names=names)
            expected = _one_at_a_time(model, lambda x=x: model(x=x), names)
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["portable", "dense"])
def test_a_broken_adapter_in_an_earlier_step_leaves_the_other_rows_of_later_steps_alone(op, monkeypatch):
    if op == "dense":
        _dense_everywhere(monkeypatch)
    model = _three_adapter_mlp()
    with torch.no_grad():
        for adapter in _adapters(model, "c"):
            adapter.lora_B.fill_(float("nan"))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        broken = model(x=x, adapter_names=["a", "c", "b"])
        later = model(x=x[:2], adapter_names=["a", "b"])  # a plan covering c too would spread its NaN by 0 * NaN
        expected = _one_at_a_time(model, lambda: model(x=x[:2]), ["a", "b"])
    assert broken[1].isnan().all() and not broken[[0, 2]].isnan().any()
    torch.testing.assert_close(later, expected, atol=1e-5, rtol=1e-5)


def test_the_same_adapter_names_get_the_same_routing_until_the_tree_changes():
    model = _three_adapter_mlp()
    routing = model.state.routing_for(EVEN)
    assert model.state.routing_for(list(EVEN)) is routing
    model.add_adapter("d", _CONFIG)
    assert model.state.routing_for(EVEN) is not routing
    routing = model.state.routing_for(EVEN)
    for i in range(ROUTINGS_KEPT):  # as many other lists as are kept: EVEN's is the least recent, dropped
        model.state.routing_for(["a"] * (i + 1))
    assert model.state.routing_for(EVEN) is not routing


@pytest.mark.parametrize("names", [EVEN, UNEVEN, WHOLE, PART], ids=["even", "uneven", "whole-batch", "part"])
def test_what_a_routed_call_under_inference_mode_keeps_serves_a_later_backward(names):
    model = _three_adapter_mlp().requires_grad_(False)  # frozen factors: their stacked copies are kept
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x=x, adapter_names=names)
    x.requires_grad_(True)
    mixed = torch.autograd.grad(model(x=x, adapter_names=names).pow(2).sum(), x)[0]  # rows and stacks are saved
    expected = _one_at_a_time(model, lambda: torch.autograd.grad(model(x=x).pow(2).sum(), x)[0], names)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_merged_elsewhere_stops_routing_of_the_others():
    model = _three_adapter_mlp()
    model.merge_adapter(["c"])  # in the weights of every row, whatever the row's adapter
    with pytest.raises(LorakitError, match=r"\['c'\] are merged into the weights; unmerge_adapter"):
        model(torch.randn(2, 6), adapter_names=["a", "__base__"])
    assert model.state.routing is None


def test_a_compiled_model_in_eval_mode_routes_new_adapter_names_without_compiling_again():
    """Inference under torch.compile: each new adapter_names list (a server's every step) reuses the compiled model,
    one graph whose routed layers call an op that runs the routing of the moment. Graphs are counted by the backend."""
    model = _three_adapter_mlp().eval()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(model.model, backend=counting, fullgraph=True)  # one graph: the routing outside it
    with torch.no_grad():
        for i, names in enumerate((EVEN, UNEVEN, EVEN[::-1], ["a"] * 6, EVEN)):
            with model.routed(list(names)):
                mixed = compiled(x=x)
            if i == 0:
                first = len(graphs)
            expected = _one_at_a_time(model, lambda: model(x=x), list(names))
            torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
        assert len(graphs) == first == 1  # no routing after the first compiled anything
        _double_scale(model)
        with model.routed(EVEN):
            mixed = compiled(x=x)
        torch.testing.assert_close(mixed, _one_at_a_time(model, lambda: model(x=x), EVEN), atol=1e-5, rtol=1e-5)


def test_a_compiled_model_refuses_routing_after_a_merge_with_lorakits_error():
    """Merged adapters are in every row's weight: a compiled model (one graph, the routed terms in their op) refuses
    to route once one is merged, with the same error as eagerly, and routes again after unmerging."""
    model = _three_adapter_mlp()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        with model.routed(EVEN):
            before = compiled(x=x)
        model.merge_adapter(["c"])
        merged = pytest.raises(LorakitError, match=r"\['c'\] are merged into the weights; unmerge_adapter")
        with merged, model.routed(EVEN):
            compiled(x=x)
        assert model.state.routing is None
        model.unmerge_adapter()
        with model.routed(EVEN):
            torch.testing.assert_close(compiled(x=x), before, atol=1e-5, rtol=1e-5)


def test_a_compiled_deep_copy_routes_through_its_own_layers():
    """The compiled routed op names its layer by a number: a deep copy's layers get numbers of their own, so the copy
    runs its own adapters (here changed after copying), not the original's."""
    model = _three_adapter_mlp()
    twin = copy.deepcopy(model)
    _scale_factor_in_place(twin)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for which in (model, twin):
            compiled = torch.compile(which.model, backend="eager", fullgraph=True)
            with which.routed(EVEN):
                mixed = compiled(x=x)
            expected = _one_at_a_time(which, partial(which, x=x), EVEN)
            torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


def test_without_the_cudagraph_unsafe_tag_compiled_routing_breaks_the_graph_and_stays_right(monkeypatch):
    """On a torch whose ops cannot be marked unsafe for CUDA graphs, the routed terms run eagerly between graphs
    (a graph replay would otherwise repeat the routing it recorded)."""
    import lorakit.layer

    monkeypatch.setattr(lorakit.layer, "_UNSAFE_IN_GRAPHS", None)
    model = _three_adapter_mlp()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model.model, backend="eager")
    with torch.no_grad():
        for names in (EVEN, UNEVEN):
            with model.routed(names):
                mixed = compiled(x=x)
            torch.testing.assert_close(mixed, _one_at_a_time(model, lambda: model(x=x), names), atol=1e-5, rtol=1e-5)


def test_a_compiled_model_routes_rows_and_sees_a_changed_scale():
    model = _three_adapter_mlp()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model.model, backend="eager")
    with torch.no_grad():
        for names in (EVEN, UNEVEN, EVEN):
            with model.routed(names):
                mixed = compiled(x=x)
            expected = _one_at_a_time(model, lambda: model(x=x), names)
            torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
        _double_scale(model)
        with model.routed(EVEN):
            mixed = compiled(x=x)
        torch.testing.assert_close(mixed, _one_at_a_time(model, lambda: model(x=x), EVEN), atol=1e-5, rtol=1e-5)


# -- decode steps through the gathered tables (lorakit.layer, ops.gathered) ------------------------------------------
def _gathered_on_cpu(monkeypatch) -> None:
    """The gathered path on the CPU too, through its reference (on CUDA the kernels read the same tables); dynamo
    forgets earlier tests' models, which compiled the same transformers code (its recompile limit counts them)."""
    import lorakit.layer

    monkeypatch.setattr(lorakit.layer, "GATHER_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()


def _decode_model() -> LoraModel:
    """Adapters of ranks 4, 2, 3 on different layers; c a child of a (its rows run a's term too)."""
    torch.manual_seed(3)
    model = get_lora_model(
        tiny_llama(), LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"), adapter_name="a"
    )
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("c", LoraConfig(r=3, init_lora_weights=False, target_modules="all-linear"), parent="a")
    return model.eval()


DECODE_ROUTINGS = [["a", "b", "c", "__base__"], ["c", "c", "b", "a"], ["__base__"] * 4, ["b", "a", "a", "c"]]


def _compiled_decode(model: LoraModel, names: list[str], ids: torch.Tensor, compiled) -> torch.Tensor:
    with model.routed(names):
        return compiled(input_ids=ids, use_cache=False).logits


def _no_routed_op(graphs) -> bool:
    return not any("add_routed_terms_" in str(node.target) for g in graphs for node in g.graph.nodes)


def test_compiled_decode_steps_route_through_the_gathered_tables_in_one_graph(monkeypatch):
    """A decode step (one token a row, beams too) of a compiled model in eval mode adds its routed terms inside the
    graph through each layer's table: no routed op, one graph for every routing, each row as eagerly."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    with torch.no_grad():
        for rows in (4, 8):  # 8: two beams a row, as generate repeats them
            ids = _ids(64, rows, 1)
            for names in DECODE_ROUTINGS:
                got = _compiled_decode(model, names, ids, compiled)
                with model.routed(names):
                    torch.testing.assert_close(got, model.model(input_ids=ids, use_cache=False).logits)
        assert len(graphs) == 2 and _no_routed_op(graphs)  # one graph per batch shape
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(layer._gather is not None for layer in layers)
        mixed = _compiled_decode(model, DECODE_ROUTINGS[0], _ids(64, 4, 1), compiled)
        assert not torch.allclose(mixed[0], mixed[3]) and not torch.allclose(mixed[0], mixed[2])  # a vs c, vs base


def test_a_compiled_decode_step_reads_the_state_through_one_place(monkeypatch):
    """Every layer of a compiled decode step reaches the routed state through state.GATHERING: the graph guards no
    layer's own reference to it (each would be checked, layer by layer, to be the same object). The block leaves
    nothing there, whether it ends or raises."""
    from lorakit.state import GATHERING

    _gathered_on_cpu(monkeypatch)
    model, names = _decode_model(), DECODE_ROUTINGS[0]
    guarded = []

    def kept(entries):
        guarded.extend(e.name for e in entries)
        return [True] * len(entries)

    compiled = torch.compile(model.model, backend="eager", fullgraph=True, options={"guard_filter_fn": kept})
    ids = _ids(64, 4, 1)
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
        with pytest.raises(RuntimeError), model.routed(names):
            assert {model.state.gather_token: model.state} == GATHERING
            raise RuntimeError("inside the block")
    assert guarded and not [name for name in guarded if ".state" in name]
    assert any("GATHERING" in name for name in guarded) and not GATHERING


@torch.library.custom_op("lorakit_test::read_entries", mutates_args=())
def _read_entries(x: torch.Tensor, entries: list[torch.Tensor]) -> torch.Tensor:
    """Stands for the CUDA kernels in a CPU graph: it takes the tables' entries as they do."""
    return x.new_zeros(())


@_read_entries.register_fake
def _(x, entries):
    return x.new_zeros(())


def test_a_compiled_decode_step_takes_every_layers_table_as_one_input(monkeypatch):
    """The layers' tables are rows of one tensor, reached through one place: the graph takes one table input for
    all the routed layers, where one each would be gathered and checked by the host at every step."""
    import lorakit.layer

    _gathered_on_cpu(monkeypatch)
    real = lorakit.layer.ops.gathered_linear_group

    def reading(x, weights, biases, slots, tables):
        _read_entries(x, [lorakit.layer.ops.gathered.entries_of(t) for t in tables])
        return real(x, weights, biases, slots, tables)

    monkeypatch.setattr(lorakit.layer.ops, "gathered_linear_group", reading)
    model, names, ids = _decode_model(), DECODE_ROUTINGS[0], _ids(64, 4, 1)
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    inputs = [n.meta["example_value"] for n in graphs[0].graph.nodes if n.op == "placeholder"]
    tables = [v for v in inputs if v.dtype == torch.int64 and v.shape[-1] == 4]
    assert len({layer._gather.home for layer in layers}) == 1
    assert len(tables) == 1 and tuple(tables[0].shape) == (len(layers), 3, 4)
    marked = [n for n in graphs[0].graph.nodes if "read_entries" in str(n.target)]
    assert len(marked) == 4 * 2  # q k v, o, gate up, down: two layers


def test_a_compiled_decode_step_reads_every_routing_s_slots_at_one_static_address(monkeypatch):
    """The routing's slots reach the graph in one tensor per shape, marked static and refilled when the routing
    changes: CUDA graphs read it in place, where a tensor per routing would be copied in at every replay."""
    _gathered_on_cpu(monkeypatch)
    model, ids = _decode_model(), _ids(64, 4, 1)
    seen = []

    def backend(gm, _):
        values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        slots_at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.dtype == torch.int32]
        assert len(slots_at) == 1

        def run(*args):
            seen.append(args[slots_at[0]])
            return gm.forward(*args)

        return run

    compiled = torch.compile(model.model, backend=backend, fullgraph=True)
    numbers = None
    with torch.no_grad():
        for names in DECODE_ROUTINGS + DECODE_ROUTINGS[:1]:
            got = _compiled_decode(model, names, ids, compiled)
            torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
            numbers = model.state.gather_numbers
            want = model.state.routing_for(names).slots_for(numbers, ids.device, model.state.gather_width)
            assert torch.equal(seen[-1], want)  # the values this routing gives, read at the step
    assert len(seen) == len(DECODE_ROUTINGS) + 1 and all(s is seen[0] for s in seen)
    assert seen[0]._dynamo_static_input_type == "unguarded"
    with torch.no_grad():  # another shape: a tensor of its own, and the first kept for the first shape
        _compiled_decode(model, ["a"] * 8, _ids(64, 8, 1), compiled)
        assert seen[-1] is not seen[0] and seen[-1].shape[0] == 8
        _compiled_decode(model, DECODE_ROUTINGS[1], ids, compiled)
        assert seen[-1] is seen[0]
        twin = copy.deepcopy(model)  # its routings' kept tensors are copies: it holds slots of its own
        twin_compiled = torch.compile(twin.model, backend=backend, fullgraph=True)
        start = len(seen)
        for names in DECODE_ROUTINGS[:2] * 2:
            got = _compiled_decode(twin, names, ids, twin_compiled)
            torch.testing.assert_close(got, _compiled_decode(model, names, ids, compiled))
        twins, originals = seen[start::2], seen[start + 1 :: 2]
        assert all(s is twins[0] for s in twins) and twins[0] is not seen[0] and all(s is seen[0] for s in originals)


def _guarded_sources(compiled_code) -> list[str]:
    """What a compiled frame's guards read, as dynamo names them (L['args'][0]._modules[...]...)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(compiled_code)
    assert len(entries) == 1
    return re.findall(r"source=(.*?), accessed_by=", str(entries[0].guard_manager))


def test_a_compiled_decode_step_guards_one_number_a_layer(monkeypatch):
    """What a routed layer's path depends on (its table's place and sizes, its siblings, its state's key, the
    packed offsets) is one plan: the compiled step guards the plan's number in each layer, never those values one
    by one, which the host would check at every step."""
    _gathered_on_cpu(monkeypatch)
    model, names, ids = _decode_model(), DECODE_ROUTINGS[0], _ids(64, 4, 1)
    compiled = torch.compile(model.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
    sources = _guarded_sources(type(model.model).forward.__code__)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(m._gather is not None for m in layers) and any(m._gather_group is not None for m in layers)
    plan_reads = [s for s in sources if s.endswith("._plan")]
    assert len(plan_reads) == len(layers)
    per_layer = ("_gather", "_table", "_gather_group", "_gather_token", "_fast", "acts_on_weight")
    table_fields = ("row", "home", "n_in", "n_out", "block_r", "aligned", "dtype")
    leaked = [s for s in sources if re.search(rf"\.({'|'.join(per_layer + table_fields)})$|\['_(gather|fast)", s)]
    assert not leaked


def _guarded_flags(model: LoraModel) -> set[str]:
    """The adapted layers whose training flag the compiled step (its newest entry) guards, by their leaf name."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    newest = _debug_get_cache_entry_list(type(model.model).forward.__code__)[0]
    sources = re.findall(r"source=(.*?), accessed_by=", str(newest.guard_manager))
    layers = {n.rsplit(".", 1)[-1] for n, m in model.model.named_modules() if isinstance(m, LoraLayer)}
    return {m.group(1) for s in sources if (m := re.search(r"\['(\w+)'\]\.training$", s)) and m.group(1) in layers}


def test_without_dropout_a_compiled_decode_step_in_training_mode_reads_no_training_flag(monkeypatch):
    """Adapters that draw no dropout mask give the same terms in training mode: the step goes through the tables,
    equal to the eval model's, and guards no adapted layer's training flag."""
    _gathered_on_cpu(monkeypatch)
    model, names, ids = _decode_model().train(), DECODE_ROUTINGS[0], _ids(64, 4, 1)
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        want = _eager_routed(model.eval(), names, input_ids=ids, use_cache=False)
    torch.testing.assert_close(got, want)
    assert _no_routed_op(graphs) and not _guarded_flags(model)


def test_a_compiled_decode_step_draws_the_dropout_of_adapters_that_have_one(monkeypatch):
    """In training mode a layer with an adapter's dropout draws its mask (not the tables' undropped terms), and
    only such layers have their training flag guarded."""
    _gathered_on_cpu(monkeypatch)
    torch.manual_seed(3)
    drops = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model = get_lora_model(tiny_llama(), drops, adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules="all-linear"))
    names, ids = ["a", "b", "a", "b"], _ids(64, 4, 1)
    compiled = torch.compile(model.model.train(), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(0)
        first = _compiled_decode(model, names, ids, compiled)
        torch.manual_seed(1)
        second = _compiled_decode(model, names, ids, compiled)
        model.eval()
        undropped = _eager_routed(model, names, input_ids=ids, use_cache=False)
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(first[0], undropped[0])  # a's rows drop
    torch.testing.assert_close(first[1], undropped[1])  # b's rows: no dropout anywhere
    assert _guarded_flags(model) == {"q_proj", "v_proj"}


def _delete_and_readd_b(model: LoraModel) -> None:
    model.delete_adapter("b")
    torch.manual_seed(11)
    model.add_adapter("b", LoraConfig(r=5, init_lora_weights=False, target_modules=["q_proj", "o_proj"]))


def _swap_b(model: LoraModel) -> None:
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer) and "b" in m.adapters):
        other = copy.deepcopy(layer.adapters["b"])
        with torch.no_grad():
            other.lora_B.mul_(-3)
        layer.adapters["b"] = other


DECODE_CHANGES = {
    "factor-in-place": lambda model: [a.lora_B.data.mul_(-3) for a in _adapters(model, "b")],
    "scale": _double_scale,
    "factor-replaced": _replace_factor,
    "deleted-and-readded": _delete_and_readd_b,
    "module-swapped": _swap_b,
    "to-float64": lambda model: model.double(),
}


@pytest.mark.parametrize("change", DECODE_CHANGES, ids=str)
def test_compiled_gathered_decode_steps_see_each_change_of_the_adapters(change, monkeypatch):
    """The tables follow the adapters: changed in place (read where they are), or set, deleted, swapped, moved
    (rebuilt as the next routed block starts)."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    ids = _ids(64, 4, 1)
    compiled = torch.compile(model.model, backend="eager", fullgraph=True)
    names = ["b", "a", "b", "__base__"]
    with torch.no_grad():
        before = _compiled_decode(model, names, ids, compiled)
        DECODE_CHANGES[change](model)
        got = _compiled_decode(model, names, ids, compiled)
        want = model(input_ids=ids, use_cache=False, adapter_names=names).logits
    torch.testing.assert_close(got, want)
    assert (change == "to-float64") == torch.allclose(got[0].float(), before[0])  # b's row changed (not its dtype)
    torch.testing.assert_close(got[1].float(), before[1], atol=1e-5, rtol=1e-5)  # a's did not


def test_compiled_gathered_decode_steps_refuse_merged_adapters_and_route_variants_through_the_op(monkeypatch):
    """A merge after compiling is refused as eagerly (the merged layers' tables are gone, so the op runs and
    refuses); a layer holding a DoRA adapter has no table, and its routed terms go through the op."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    model.add_adapter("d", LoraConfig(r=2, use_dora=True, init_lora_weights=False, target_modules=["v_proj"]))
    ids = _ids(64, 4, 1)
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    names = ["d", "a", "b", "c"]
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, model(input_ids=ids, use_cache=False, adapter_names=names).logits)
        assert not _no_routed_op(graphs)  # the v_proj layers
        model.merge_adapter(["b"])
        with pytest.raises(LorakitError, match=r"\['b'\] are merged into the weights; unmerge_adapter"):
            _compiled_decode(model, names, ids, compiled)
        model.unmerge_adapter()
        torch.testing.assert_close(_compiled_decode(model, names, ids, compiled), got, atol=1e-5, rtol=1e-5)


def test_a_compiled_lora_model_called_with_adapter_names_prepares_the_tables_outside_its_graphs(monkeypatch):
    """torch.compile over the LoraModel itself traces its routed() block too: the tables and slots are still made
    eagerly (the hook is never traced), and every routing gives each row its own adapters."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    compiled = torch.compile(model, backend="eager")
    ids = _ids(64, 4, 1)
    with torch.no_grad():
        for names in DECODE_ROUTINGS * 2:
            got = compiled(input_ids=ids, use_cache=False, adapter_names=names).logits
            torch.testing.assert_close(got, model(input_ids=ids, use_cache=False, adapter_names=names).logits)
    assert model.state.gather_owner == id(model.state) and model.state.gather_slots is None  # built; slots cleared


def test_tables_are_kept_up_to_date_only_for_a_model_that_routes_compiled(monkeypatch):
    """Built at the first routed block (a model compiled after it traces them at once); after a change, rebuilt
    only once a compiled model has routed through the state, else dropped: eager routing never reads them, and
    rebuilding every layer's table at every adapter load would cost it for nothing."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids, names = _ids(64, 4, 1), ["b", "a", "c", "__base__"]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, adapter_names=names)
        assert all(layer._gather is not None for layer in layers)
        _double_scale(model)
        model(input_ids=ids, use_cache=False, adapter_names=names)
        assert all(layer._gather is None for layer in layers) and not model.state.gather_wanted
        compiled = torch.compile(model.model, backend="eager", fullgraph=True)
        for _ in range(2):  # the first through the routed op, which asks for the tables; the second through them
            got = _compiled_decode(model, names, ids, compiled)
        assert model.state.gather_wanted and all(layer._gather is not None for layer in layers)
        torch.testing.assert_close(got, model(input_ids=ids, use_cache=False, adapter_names=names).logits)
        _double_scale(model)
        got = _compiled_decode(model, names, ids, compiled)
        assert all(layer._gather is not None for layer in layers)  # kept up to date from now on
        torch.testing.assert_close(got, model(input_ids=ids, use_cache=False, adapter_names=names).logits)


@pytest.mark.parametrize("change", ["scale", "deleted-and-readded"], ids=str)
def test_a_change_inside_a_routed_block_makes_the_compiled_step_take_the_op(change, monkeypatch):
    """A change after the block started leaves its tables stale until the next block rebuilds them: the compiled
    graph guards the flag, so the step after the change runs through the op and sees it, and the next block reads
    the rebuilt tables in the first graph again."""
    _gathered_on_cpu(monkeypatch)
    model = _decode_model()
    ids, names = _ids(64, 4, 1), ["b", "a", "c", "__base__"]
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    with torch.no_grad():
        _compiled_decode(model, names, ids, compiled)
        with model.routed(names):
            DECODE_CHANGES[change](model)
            assert not model.state.gather_fresh
            inside = compiled(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False, adapter_names=names).logits
        again = _compiled_decode(model, names, ids, compiled)
    torch.testing.assert_close(inside, want)
    torch.testing.assert_close(again, want)
    assert model.state.gather_fresh and not _no_routed_op(graphs[1:2])  # the step inside: through the op
    # before and after, through the tables (a third graph on CPU only: the reference reads the factors in Python)
    assert _no_routed_op(graphs[:1]) and _no_routed_op(graphs[2:]) and len(graphs) <= 3


@pytest.mark.parametrize("gathered", [True, False], ids=["tables", "float64-no-tables"])
def test_tables_are_built_once_per_change_not_at_every_routed_block(gathered, monkeypatch):
    """A routed block after no change costs one flag read: the tables (or, where no layer can have one, their
    absence: the kernels take no float64) are rebuilt at the first block and after each change only, whatever
    the blocks in between."""
    import lorakit.layer

    _gathered_on_cpu(monkeypatch)
    builds, real = [], lorakit.layer._build_tables
    monkeypatch.setattr(lorakit.layer, "_build_tables", lambda *a: builds.append(a[1]) or real(*a))
    model = _decode_model() if gathered else _decode_model().double()
    ids, names = _ids(64, 4, 1), ["b", "a", "c", "__base__"]
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False, adapter_names=names)
        assert len(builds) == 1
        _double_scale(model)
        for _ in range(3):
            model(input_ids=ids, use_cache=False, adapter_names=names)
    assert builds == [True, False]  # the second drops what the first built: no compiled model read them
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(layer._gather is None for layer in layers)


# -- siblings of a decode step in one gathered launch (lorakit.layer._siblings) --------------------------------------
@torch.library.custom_op("lorakit_test::gathered_group", mutates_args=())
def _group_marker(x: torch.Tensor, parts: int) -> torch.Tensor:
    """What the graph shows for one group call (on CUDA, one shrink and one expand for all its members)."""
    return x.new_zeros(())


@_group_marker.register_fake
def _(x, parts):
    return x.new_zeros(())


@pytest.fixture
def group_marker(monkeypatch):
    """The group op's reference, with a marker node per call in the graph; the gathered path on the CPU."""
    import lorakit.layer

    _gathered_on_cpu(monkeypatch)
    real = lorakit.layer.ops.gathered_linear_group

    def marked(x, weights, biases, slots, tables):
        outs, terms = real(x, weights, biases, slots, tables)
        return outs, [terms[0] + _group_marker(x, len(weights)), *terms[1:]]

    monkeypatch.setattr(lorakit.layer.ops, "gathered_linear_group", marked)


def _parts(graphs) -> list[list[int]]:
    target = torch.ops.lorakit_test.gathered_group.default
    return [[n.args[1] for n in g.graph.nodes if n.target is target] for g in graphs]


def _eager_routed(model: LoraModel, names: list[str], **inputs) -> torch.Tensor:
    with model.routed(names):
        out = model.model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def test_a_compiled_decode_step_computes_siblings_in_one_op_with_the_eager_outputs(group_marker):
    """q, k and v (gate and up) of every layer: one group op in the graph, with each member's own adapters (b is on
    q and v only), every routing and a factor changed in place equal to the eager model's."""
    from lorakit import packed

    model = _decode_model()
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    ids = _ids(64, 4, 1)
    with torch.no_grad():
        for names in DECODE_ROUTINGS:
            got = _compiled_decode(model, names, ids, compiled)
            torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
        k_proj = next(m for n, m in model.named_modules() if n.endswith("k_proj") and isinstance(m, LoraLayer))
        k_proj.adapters["c"].lora_B.mul_(-2.0)
        got = _compiled_decode(model, DECODE_ROUTINGS[1], ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, DECODE_ROUTINGS[1], input_ids=ids, use_cache=False))
    assert _parts(graphs) == [[3, 1, 2, 1] * 2]  # one graph; q, k, v, o, gate and up, down of both layers
    assert packed.STASH.pending is None and not packed.BROKEN & model.state.gather_groups.keys()


class _CrossAttention(torch.nn.Module):
    """q of its own input, k and v of another: siblings by name that never share an input."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.tanh(x)
        return self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory)


def _cross_model() -> LoraModel:
    torch.manual_seed(5)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), _CrossAttention())
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_lora_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    return model.eval()


def test_siblings_called_with_other_inputs_are_gathered_apart_after_one_step(group_marker):
    """A cross-attention's q, k and v: the first step's group is found broken (its outputs still right: v takes
    what k's call computed for their shared input), and the next routed block builds the tables with them apart."""
    model = _cross_model()
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    x, names = torch.randn(4, 1, 8), ["a", "b", "__base__", "b"]
    with torch.no_grad():
        want = _eager_routed(model, names, input=x)
        for _ in range(3):
            with model.routed(names):
                torch.testing.assert_close(compiled(x), want)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert _parts(graphs) == [[3, 3], [1, 1, 1]] and all(m._gather_group is None for m in layers)
    assert all(m._gather is not None for m in layers)  # apart, each through its own table


def test_a_hook_on_a_sibling_s_base_keeps_its_group_off(group_marker):
    model = _decode_model()
    k_proj = next(m for n, m in model.named_modules() if n.endswith("k_proj") and isinstance(m, LoraLayer))
    k_proj.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    ids, names = _ids(64, 4, 1), DECODE_ROUTINGS[0]
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
    # the first layer's q, k, v each through its own table (add_gathered_lora, no marker), its o (1), gate and up
    # (2), down (1); the second layer's q, k, v together (3), o, gate and up, down
    assert _parts(graphs) == [[1, 2, 1, 3, 1, 2, 1]]


def test_siblings_of_different_ranks_still_share_one_op(group_marker):
    """q's adapter of rank 20 (a wider rank tile than k's and v's): the group serves all three at the widest."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear", rank_pattern={"q_proj": 20})
    model = get_lora_model(tiny_llama(), config, adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules="all-linear"))
    model.eval()
    graphs = []
    compiled = torch.compile(model.model, backend=lambda g, _: graphs.append(g) or g.forward, fullgraph=True)
    ids, names = _ids(64, 4, 1), ["a", "b", "__base__", "a"]
    with torch.no_grad():
        got = _compiled_decode(model, names, ids, compiled)
        torch.testing.assert_close(got, _eager_routed(model, names, input_ids=ids, use_cache=False))
    q_proj = next(m for n, m in model.named_modules() if n.endswith("q_proj") and isinstance(m, LoraLayer))
    k_proj = next(m for n, m in model.named_modules() if n.endswith("k_proj") and isinstance(m, LoraLayer))
    assert (q_proj._gather.block_r, k_proj._gather.block_r) == (32, 16)
    assert _parts(graphs) == [[3, 1, 2, 1] * 2]  # q, k, v; o; gate, up; down of both layers
