"""Mixed-adapter batches: row i of model(x, adapter_names=names) equals the model with only names[i] active."""

from __future__ import annotations

import peft
import pytest
import torch

from lorakit import LoraConfig, LorakitError, LoraModel, VeraConfig, get_lora_model
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


def test_training_on_a_mixed_batch_gives_each_adapter_its_own_rows_gradient():
    model = _model(
        mlp,
        LoraConfig(r=2, init_lora_weights=False, target_modules=["lin0", "lin1"]),
        LoraConfig(r=3, init_lora_weights=False, target_modules=["lin1"]),
    ).train()
    model.set_adapter(["a", "b"])  # both trainable; routing, not the active set, decides which rows use which
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "b", "a"]
    model(x=x, adapter_names=names).pow(2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for name, rows in (("a", [0, 3]), ("b", [1, 2])):
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
    assert model.state.routing is None


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
