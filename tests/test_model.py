"""LoraModel behaviour: identity at init, what trains, adapters by name, enable/disable."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraLayer, LoraModel, get_lora_model
from tests.cases import CASES, Case, conv_mlp, ids_input, output, positional, tiny_bert_cls, tiny_llama


def _run(model, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**case.inputs()))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_identity_at_init_and_change_after_random_factors(case: Case):
    base = case.build().eval()
    expected = _run(base, case)
    model = get_lora_model(case.build(), LoraConfig(**case.config)).eval()
    assert torch.equal(_run(model, case), expected)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.adapters.values():
                    for param in adapter.parameters():  # A and B, or a variant's own (trained token rows)
                        param.normal_()
    assert not torch.allclose(_run(model, case), expected, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_only_adapters_train_and_base_weights_stay(case: Case):
    torch.manual_seed(0)
    config = LoraConfig(init_lora_weights=False, **case.config)
    model = get_lora_model(case.build(), config).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    output(model(**case.inputs())).float().pow(2).mean().backward()
    optimizer.step()

    for name, param in model.named_parameters():
        is_adapter = ".adapters." in name or ".copies." in name
        is_bias = config.bias == "all" and name.endswith("bias") and ".original_module." not in name
        should_train = is_adapter or is_bias
        assert param.requires_grad == should_train, name
        if not should_train:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


@pytest.mark.parametrize("case", CASES, ids=str)
def test_trainable_count_equals_peft(case: Case):
    ours = get_lora_model(case.build(), LoraConfig(**case.config))
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(**case.config))
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_trainable_counts_equal_peft_with_a_saved_module():
    # PEFT counts a modules_to_save module twice in the total: its frozen original and its trained copy
    config = {"r": 4, "target_modules": ["query"], "task_type": "SEQ_CLS"}
    model = get_lora_model(tiny_bert_cls(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**config))
    base_total = sum(p.numel() for p in tiny_bert_cls().parameters())
    lora = 2 * (4 * 32 + 32 * 4)  # two layers, A (4x32) + B (32x4)
    head = 32 * 3 + 3
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert model.get_nb_trainable_parameters() == (lora + head, base_total + lora + head)


def _two_adapters():
    case = Case("mlp", conv_mlp, positional(ids_input(20)))
    torch.manual_seed(0)
    model = get_lora_model(case.build(), LoraConfig(init_lora_weights=False, target_modules=["lin1", "lin2"]))
    model.add_adapter("b", LoraConfig(init_lora_weights=False, r=2, target_modules=["lin2", "conv1"]))
    return model.eval(), case


def test_added_adapter_is_inactive_until_set_and_contributions_add_up():
    model, case = _two_adapters()
    assert model.active_adapters == ["default"]
    only_default = _run(model, case)
    with model.disable_adapter():
        base = _run(model, case)
    model.set_adapter("b")
    only_b = _run(model, case)
    model.set_adapter(["default", "b"])
    both = _run(model, case)
    assert not torch.allclose(only_b, only_default)
    # contributions are summed before the non-linear layers, so check layer by layer instead of outputs
    x = torch.randn(3, 16)
    layer = model.model.lin2
    y_base = layer.base_layer(x)
    parts = [layer.adapters[n].contribution(layer.base_layer, x) for n in ("default", "b")]
    torch.testing.assert_close(layer(x), y_base + parts[0] + parts[1])
    assert not torch.allclose(both, base)


def test_a_variant_set_on_an_adapter_after_creation_decides_its_forward():
    """The layer reads an adapter's own flag for "plain LoRA on a matmul" (one guarded value per adapter when
    compiled); setting another variant must clear it, so the variant's contribution is what the forward adds."""
    from lorakit.variants.lora import Lora

    class Doubled(Lora):
        def contribution(self, adapter, module, x, base_out=None):
            return 2 * super().contribution(adapter, module, x, base_out)

    model, _ = _two_adapters()
    layer, x = model.model.lin2, torch.randn(3, 16)
    adapter = layer.adapters["default"]
    plain = layer(x) - layer.base_layer(x)
    adapter.variant = Doubled()
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * plain)
    adapter.variant = Lora()
    torch.testing.assert_close(layer(x) - layer.base_layer(x), plain)


@pytest.mark.parametrize("routed", [False, True], ids=["active", "routed"])
@pytest.mark.parametrize("hook", ["global-forward", "global-backward", "own-backward"])
def test_hooks_on_the_base_layer_still_run_under_a_lora_layer(hook, routed):
    """The layer computes a bare nn.Linear as F.linear itself only when no hook would have run: a hook registered
    on the base module, or globally for every module, still sees the base layer's call."""
    from torch.nn.modules import module as nn_module

    model, _ = _two_adapters()
    layer = model.model.lin2
    seen = []
    x = torch.randn(2, 3, 16, requires_grad=True)

    def record(module, *_):
        if module is layer.base_layer:
            seen.append(module)

    handle = {
        "global-forward": lambda: nn_module.register_module_forward_hook(record),
        "global-backward": lambda: nn_module.register_module_full_backward_hook(record),
        "own-backward": lambda: layer.base_layer.register_full_backward_hook(record),
    }[hook]()
    try:
        if routed:
            with model.routed(["default", "b"]):
                layer(x).sum().backward()
        else:
            layer(x).sum().backward()
    finally:
        handle.remove()
    assert seen == [layer.base_layer]


def test_set_adapter_switches_what_trains():
    model, _ = _two_adapters()
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


def test_disable_adapter_gives_base_outputs_even_when_merged():
    model, case = _two_adapters()
    base = _run(case.build().eval(), case)
    adapted = _run(model, case)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_run(model, case), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(model, case), adapted, atol=1e-5, rtol=0)
    assert all(
        layer.merged_adapters == ["default"]
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
        if "default" in layer.adapters
    )


def test_delete_adapter_and_last_delete_restores_the_base_modules():
    model, case = _two_adapters()
    model.set_adapter(["default", "b"])
    model.delete_adapter("default")
    assert model.active_adapters == ["b"]
    assert all("default" not in m.adapters for m in model.modules() if isinstance(m, LoraLayer))
    model.delete_adapter("b")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(_run(model, case), _run(case.build().eval(), case))
    with pytest.raises(LorakitError, match="unknown adapter"):
        model.set_adapter("b")


def test_adding_an_existing_name_is_refused():
    model, _ = _two_adapters()
    with pytest.raises(LorakitError, match="exists already"):
        model.add_adapter("b", LoraConfig(target_modules=["lin1"]))


def test_dropout_applies_in_train_mode_only():
    torch.manual_seed(0)
    model = get_lora_model(
        nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], lora_dropout=0.5, init_lora_weights=False)
    )
    x = torch.randn(64, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_llama_generate_passes_through():
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    assert model.config.model_type == "llama"


def test_forward_shows_the_base_signature_and_a_deepcopy_calls_its_own_model():
    import copy
    import inspect

    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    base_params = list(inspect.signature(model.model.forward).parameters)
    assert list(inspect.signature(model.forward).parameters) == base_params  # what transformers.Trainer reads
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.parameters():
            if param.requires_grad:
                param.mul_(3)
    inputs = ids_input(64)()
    with torch.no_grad():
        assert not torch.allclose(twin(**inputs).logits, model(**inputs).logits)
        torch.testing.assert_close(model(**inputs).logits, model.model(**inputs).logits)


def test_a_deleted_model_is_freed_at_once_without_the_cycle_collector():
    import gc
    import weakref

    gc.collect()
    gc.disable()  # `del model; torch.cuda.empty_cache()` must free the memory: no reference cycle through forward
    try:
        model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "layer, dtype, shape",
    [(nn.Conv2d(8, 8, 1), torch.float16, (2, 8, 5, 5)), (nn.Linear(32, 32), torch.bfloat16, (6, 32))],
    ids=["fp16-conv1x1", "bf16-linear"],
)
def test_half_precision_adds_fp32_terms_and_rounds_once_like_peft(tmp_path, layer, dtype, shape):
    torch.manual_seed(0)
    base = nn.Sequential(layer).to(dtype)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=["0"])
    ours = get_lora_model(copy.deepcopy(base), config)
    ours.add_adapter("b", LoraConfig(r=2, lora_alpha=8, init_lora_weights=False, target_modules=["0"]))
    ours.set_adapter(["default", "b"])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(["default", "b"])
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_inside_disable_adapter_nothing_trains_and_flags_come_back():
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], modules_to_save=["head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    with model.disable_adapter():
        assert not any(p.requires_grad for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_disabling_adapters_that_trained_biases_warns_as_peft_does():
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], bias="lora_only"))
    with pytest.warns(UserWarning, match="bias configured to be 'lora_only'"), model.disable_adapter():
        pass


def test_a_second_adapter_with_bias_is_refused():
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], bias="all"))
    with pytest.raises(LorakitError, match="already trains the biases"):
        model.add_adapter("b", LoraConfig(target_modules=["lin2"], bias="all"))
    assert list(model.peft_config) == ["default"]
    assert not any(".b." in n for n, _ in model.named_parameters())


def test_two_active_adapters_with_copies_of_one_module_are_refused():
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], modules_to_save=["head"]))
    model.add_adapter("b", LoraConfig(target_modules=["lin2"], modules_to_save=["head"]))
    with pytest.raises(LorakitError, match=r"adapters \['default', 'b'\] each train their own copy"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize(
    "first, second",
    [({"target_modules": ["lin1"]}, {"target_modules": ["lin2"], "modules_to_save": ["lin1"]}),
     ({"target_modules": ["lin1"], "modules_to_save": ["head"]}, {"target_modules": ["head"]})],
    ids=["saved-over-lora", "lora-over-saved"],
)  # fmt: skip
def test_a_module_is_either_trained_in_full_or_wrapped_with_lora(first, second):
    model = get_lora_model(conv_mlp(), LoraConfig(**first))
    structure = [type(m) for m in model.modules()]
    with pytest.raises(LorakitError, match="a module cannot be both"):
        model.add_adapter("b", LoraConfig(**second))
    assert [type(m) for m in model.modules()] == structure and list(model.peft_config) == ["default"]


def test_delta_lora_moves_the_weight_under_any_optimizer_the_user_builds():
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["lin1"], variant="delta_lora", init_lora_weights=False)
    model = get_lora_model(conv_mlp(), config)
    other = get_lora_model(conv_mlp(), config)  # its optimizer must not touch `model`
    layer = model.model.lin1
    adapter = layer.adapters["default"]
    w0, delta0 = layer.weight.detach().clone(), adapter.delta_weight().detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output(model(ids=positional(ids_input(20))()["ids"])).pow(2).mean().backward()
    optimizer.step()
    torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1).step()
    change = adapter.delta_weight().detach() - delta0
    assert change.abs().max() > 0
    torch.testing.assert_close(layer.weight.detach(), w0 + change, atol=1e-6, rtol=0)


def test_delta_lora_through_lorakit_optim_updates_once():
    from lorakit.optim import create_optimizer

    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["lin1"], variant="delta_lora", init_lora_weights=False)
    model = get_lora_model(conv_mlp(), config)
    layer, adapter = model.model.lin1, model.model.lin1.adapters["default"]
    w0, delta0 = layer.weight.detach().clone(), adapter.delta_weight().detach().clone()
    optimizer = create_optimizer(model, torch.optim.SGD, lr=0.1)
    output(model(ids=positional(ids_input(20))()["ids"])).pow(2).mean().backward()
    optimizer.step()
    change = adapter.delta_weight().detach() - delta0
    torch.testing.assert_close(layer.weight.detach(), w0 + change, atol=1e-6, rtol=0)


class _WithAttention(nn.Module):
    """A linear beside nn.MultiheadAttention, whose bias is a parameter named in_proj_bias, not bias."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(self.lin(x), x, x, need_weights=False)[0]


def test_bias_all_trains_what_peft_trains_and_saves_it_all(tmp_path):
    """bias="all" trains the parameters named `bias` (PEFT's rule), so every trained bias is in the saved file: a
    parameter whose name only ends in "bias" (in_proj_bias) stays frozen, as in PEFT, and is not lost on save."""
    torch.manual_seed(0)
    base = _WithAttention()
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["lin"], bias="all"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["lin"], bias="all"))
    trained = {n.removeprefix("model.") for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    expected = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    expected = {n for n in expected if "lora_" not in n}  # the biases: lin.base_layer.bias and the attention's
    assert trained == expected and "mha.in_proj_bias" not in trained
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(2, 3, 8)
    ours.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-6)
