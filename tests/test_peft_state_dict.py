"""PEFT's get_ / set_peft_model_state_dict and its per-layer attributes (layer.lora_A[name].weight, layer.scaling, ...)
on lorakit models: the same keys, values, outputs and attribute values as PEFT's for the same weights."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import lorakit
from lorakit import (
    LoraConfig,
    LorakitError,
    get_lora_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.inject import lora_layers
from tests.cases import conv_mlp, ids_input, mlp, output, positional, tiny_bert_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5


@dataclass
class Pair:
    """One base model and config (and optionally a second adapter "other"), built in both libraries."""

    name: str
    build: Any
    inputs: Any
    config: dict[str, Any]
    other: dict[str, Any] | None = None
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = ["default"] + (["other"] if self.other else [])

    def __str__(self) -> str:
        return self.name

    def theirs(self):
        model = peft.get_peft_model(self.build(), peft.LoraConfig(init_lora_weights=False, **self.config))
        if self.other:
            model.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **self.other))
        return model.eval()

    def ours(self):
        model = get_lora_model(self.build(), LoraConfig(init_lora_weights=False, **self.config))
        if self.other:
            model.add_adapter("other", LoraConfig(init_lora_weights=False, **self.other))
        return model.eval()

    def run(self, model, name: str) -> torch.Tensor:
        model.set_adapter(name)
        with torch.no_grad():
            return output(model(**self.inputs()))


PAIRS = [
    Pair(
        "convmlp-every-kind-saved-head-two-adapters",
        conv_mlp,
        positional(ids_input(20)),
        {"target_modules": ["emb", "conv1", "conv2", "lin1", "lin2"], "modules_to_save": ["head"], "lora_dropout": 0.1},
        other={"target_modules": ["lin1", "emb"], "r": 4, "lora_alpha": 3, "use_rslora": True},
    ),
    Pair("llama-dora", tiny_llama, ids_input(64), {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    Pair("llama-embedding", tiny_llama, ids_input(64), {"target_modules": ["q_proj", "embed_tokens"]}),
    Pair("llama-tokens", tiny_llama, ids_input(64), {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]}),
    Pair("gpt2-conv1d", tiny_gpt2, ids_input(64), {"target_modules": ["c_attn", "c_fc"], "lora_bias": True}),
    Pair(
        "mlp-target-parameters",
        mlp,
        lambda: {"x": torch.randn(3, 6, generator=torch.Generator().manual_seed(1))},
        {"target_modules": ["lin1"], "target_parameters": ["lin0.weight"]},
    ),
]


def _perturb(state: dict[str, torch.Tensor]) -> None:
    """Every tensor of a get_peft_model_state_dict result changed in place, as if trained (they are views)."""
    with torch.no_grad():
        for tensor in state.values():
            tensor.add_(torch.randn_like(tensor) * 0.1)


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


# -- get_ / set_peft_model_state_dict ------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_a_peft_state_dict_loads_into_lorakit_and_gives_back_the_same_keys_values_and_outputs(pair: Pair):
    torch.manual_seed(0)
    theirs, ours = pair.theirs(), pair.ours()
    for name in pair.names:
        _perturb(peft.get_peft_model_state_dict(theirs, adapter_name=name))
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        result = set_peft_model_state_dict(ours, state, adapter_name=name)
        assert result.missing_keys == [] and result.unexpected_keys == []
        _assert_same(get_peft_model_state_dict(ours, adapter_name=name), state)
    for name in pair.names:
        torch.testing.assert_close(pair.run(ours, name), pair.run(theirs, name), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_a_lorakit_state_dict_loads_into_peft_with_the_same_outputs(pair: Pair):
    torch.manual_seed(1)
    ours, theirs = pair.ours(), pair.theirs()
    for name in pair.names:
        _perturb(get_peft_model_state_dict(ours, adapter_name=name))  # views: the adapter itself changes
        state = get_peft_model_state_dict(ours, adapter_name=name)
        result = peft.set_peft_model_state_dict(theirs, state, adapter_name=name)
        assert result.unexpected_keys == []
        _assert_same(state, peft.get_peft_model_state_dict(theirs, adapter_name=name))
    base = output(pair.build().eval()(**pair.inputs()))
    for name in pair.names:
        expected = pair.run(ours, name)
        assert not torch.allclose(expected, base, atol=1e-4), "the adapter must change the output"
        torch.testing.assert_close(pair.run(theirs, name), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("build", "inputs", "config"),
    [
        (conv_mlp, positional(ids_input(20)), lambda lib: lib.VeraConfig(target_modules=["lin1", "lin2"], r=4)),
        (
            tiny_llama,
            ids_input(64),
            lambda lib: lib.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 3]),
        ),
    ],
    ids=["vera", "trainable-tokens"],
)
def test_other_adapter_types_give_and_take_peft_s_keys(build, inputs, config):
    theirs = peft.get_peft_model(build(), config(peft)).eval()
    ours = get_lora_model(build(), config(lorakit)).eval()
    _perturb(peft.get_peft_model_state_dict(theirs))
    state = peft.get_peft_model_state_dict(theirs)
    assert set_peft_model_state_dict(ours, state).missing_keys == []
    _assert_same(get_peft_model_state_dict(ours), state)
    with torch.no_grad():
        torch.testing.assert_close(output(ours(**inputs())), output(theirs(**inputs())), atol=ATOL, rtol=0)


def test_values_are_detached_views_of_the_live_tensors_as_in_peft():
    pair = PAIRS[0]
    ours, theirs = pair.ours(), pair.theirs()
    for state, model in ((get_peft_model_state_dict(ours), ours), (peft.get_peft_model_state_dict(theirs), theirs)):
        key = "base_model.model.lin1.lora_A.weight"
        assert not state[key].requires_grad
        live = {p.data_ptr() for p in model.parameters()}
        assert state[key].data_ptr() in live


@pytest.mark.parametrize("choice", [True, False, "auto"])
@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "embed_tokens"]], ids=["plain", "embedding"])
def test_save_embedding_layers_gives_peft_s_keys(choice, targets):
    pair = Pair("llama", tiny_llama, ids_input(64), {"target_modules": targets})
    ours, theirs = pair.ours(), pair.theirs()
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that it saves them
        expected = peft.get_peft_model_state_dict(theirs, save_embedding_layers=choice)
    _assert_same(get_peft_model_state_dict(ours, save_embedding_layers=choice), expected)


def test_values_come_from_a_given_state_dict_as_in_peft():
    """A gathered state_dict (DeepSpeed ZeRO-3, FSDP) is where the values are read, in each library's own keys."""
    pair = PAIRS[0]
    ours, theirs = pair.ours(), pair.theirs()
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    doubled = {k: v * 2 for k, v in ours.state_dict().items()}
    expected = peft.get_peft_model_state_dict(theirs, {k: v * 2 for k, v in theirs.state_dict().items()})
    _assert_same(get_peft_model_state_dict(ours, doubled), expected)
    del doubled["model.lin1.adapters.default.lora_A"]
    with pytest.raises(LorakitError, match=r"lacks .*model\.lin1\.adapters\.default\.lora_A"):
        get_peft_model_state_dict(ours, doubled)


def test_a_compiled_model_is_read_through_unwrap_compiled():
    pair = PAIRS[1]
    ours, theirs = pair.ours(), pair.theirs()
    set_peft_model_state_dict(torch.compile(ours), peft.get_peft_model_state_dict(theirs))  # not traced: no call
    expected = peft.get_peft_model_state_dict(torch.compile(theirs), unwrap_compiled=True)
    _assert_same(get_peft_model_state_dict(torch.compile(ours), unwrap_compiled=True), expected)
    with pytest.raises(LorakitError, match="unwrap_compiled=True"):
        get_peft_model_state_dict(torch.compile(ours))


def test_bias_all_leaves_out_only_peft_s_copies_of_the_saved_head_s_bias():
    """PEFT's bias="all" picks every bias key of its state_dict, its modules_to_save wrapper's inner copies included
    (the trained head's bias twice, and the frozen original's); lorakit gives the adapter's tensors once, as its
    files do, and takes PEFT's dict with them."""
    config = {"target_modules": ["query", "key"], "bias": "all", "task_type": "SEQ_CLS"}
    pair = Pair("bert", tiny_bert_cls, ids_input(64), config)
    ours, theirs = pair.ours(), pair.theirs()
    _perturb(peft.get_peft_model_state_dict(theirs))
    state = peft.get_peft_model_state_dict(theirs)
    assert set_peft_model_state_dict(ours, state).missing_keys == []
    mine = get_peft_model_state_dict(ours)
    extra = {"base_model.model.classifier.modules_to_save.bias", "base_model.model.classifier.original_module.bias"}
    assert set(state) - set(mine) == extra and set(mine) <= set(state)
    _assert_same(mine, {k: v for k, v in state.items() if k not in extra})
    torch.testing.assert_close(pair.run(ours, "default"), pair.run(theirs, "default"), atol=ATOL, rtol=0)


def test_an_unknown_adapter_name_is_refused_as_peft_refuses_it():
    pair = PAIRS[1]
    ours, theirs = pair.ours(), pair.theirs()
    state = peft.get_peft_model_state_dict(theirs)
    with pytest.raises(KeyError):
        peft.set_peft_model_state_dict(theirs, state, adapter_name="nope")
    with pytest.raises(KeyError):
        peft.get_peft_model_state_dict(theirs, adapter_name="nope")
    with pytest.raises(LorakitError, match=r"no adapter 'nope'.*\['default'\]"):
        set_peft_model_state_dict(ours, state, adapter_name="nope")
    with pytest.raises(LorakitError, match=r"no adapter 'nope'"):
        get_peft_model_state_dict(ours, adapter_name="nope")


def test_keys_from_another_model_are_named_where_peft_only_reports_them():
    ours, theirs = PAIRS[1].ours(), PAIRS[1].theirs()
    foreign = peft.get_peft_model_state_dict(PAIRS[0].theirs())
    before = {k: v.clone() for k, v in get_peft_model_state_dict(ours).items()}
    reported = peft.set_peft_model_state_dict(theirs, foreign).unexpected_keys
    assert sorted(reported) == sorted(foreign)
    with pytest.raises(LorakitError, match="not tensors of adapter 'default'") as raised:
        set_peft_model_state_dict(ours, foreign)
    assert all(key in str(raised.value) for key in sorted(reported)[:8])
    _assert_same(get_peft_model_state_dict(ours), before)  # nothing changed


def test_a_shape_mismatch_names_the_tensor_and_both_shapes_and_ignore_mismatched_sizes_skips_it_as_peft():
    pair = PAIRS[0]
    ours, theirs = pair.ours(), pair.theirs()
    key = "base_model.model.lin1.lora_A.weight"
    state = dict(peft.get_peft_model_state_dict(theirs))
    state[key] = torch.zeros(3, 36)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.set_peft_model_state_dict(theirs, state)
    with pytest.raises(LorakitError, match=rf"{key}: the dict has \(3, 36\), the model needs \(8, 36\)"):
        set_peft_model_state_dict(ours, state)
    kept = ours.model.lin1.adapters["default"].lora_A.detach().clone()
    with pytest.warns(UserWarning, match=rf"{key}: found shape \(3, 36\)"):
        result = set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        theirs_result = peft.set_peft_model_state_dict(theirs, state, ignore_mismatched_sizes=True)
    assert result.missing_keys == [key] and result.unexpected_keys == []
    assert "base_model.model.lin1.lora_A.default.weight" in theirs_result.missing_keys
    assert torch.equal(ours.model.lin1.adapters["default"].lora_A, kept)
    rest = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if k != key}
    _assert_same({k: v for k, v in get_peft_model_state_dict(ours).items() if k != key}, rest)


def test_a_partial_dict_loads_what_it_has_and_reports_the_adapter_s_other_keys_as_peft_does():
    pair = Pair("llama", tiny_llama, ids_input(64), {"target_modules": ["q_proj", "v_proj"]})
    ours, theirs = pair.ours(), pair.theirs()
    state = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if ".lora_B." in k}
    missing = set_peft_model_state_dict(ours, state).missing_keys
    reported = peft.set_peft_model_state_dict(theirs, state).missing_keys
    peft_adapter_missing = {k.replace(".default", "") for k in reported if "lora_" in k and ".default" in k}
    assert set(missing) == peft_adapter_missing and missing  # PEFT's filtered to the adapter, as it names them


def test_setting_a_merged_adapter_is_refused():
    pair = PAIRS[1]
    ours = pair.ours()
    state = peft.get_peft_model_state_dict(pair.theirs())
    ours.merge_adapter()
    with pytest.raises(LorakitError, match="merged"):
        set_peft_model_state_dict(ours, state)


# -- PEFT's per-layer attributes -------------------------------------------------------------------------------------
def _peft_layer(theirs, path: str):
    module = theirs.base_model.model.get_submodule(path)
    return module if isinstance(module, PeftLoraLayer) else None


def _assert_layers_match(ours, theirs) -> int:
    """Every attribute PEFT's LoraLayer has, equal on each lorakit layer; returns how many layers were compared."""
    compared = 0
    for path, layer in lora_layers(ours.model):
        peft_layer = _peft_layer(theirs, path)
        if peft_layer is None:  # PEFT's trainable tokens live in a layer of another class
            assert not layer.r and not layer.lora_A and not layer.lora_embedding_A
            continue
        compared += 1
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            mine, their = getattr(layer, attr), getattr(peft_layer, attr)
            assert sorted(mine) == sorted(their), (path, attr)
            for name in their:
                assert torch.equal(mine[name].weight, their[name].weight), (path, attr, name)
                their_bias = getattr(their[name], "bias", None)
                assert (mine[name].bias is None) == (their_bias is None), (path, attr)
                assert their_bias is None or torch.equal(mine[name].bias, their_bias)
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            mine, their = getattr(layer, attr), getattr(peft_layer, attr)
            assert sorted(mine) == sorted(their) and all(torch.equal(mine[n], their[n]) for n in their), (path, attr)
        for attr in ("scaling", "r", "lora_alpha", "use_dora"):
            assert dict(getattr(layer, attr)) == getattr(peft_layer, attr), (path, attr)
        for name, dropout in peft_layer.lora_dropout.items():
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            mine = layer.lora_dropout[name]
            assert (mine.p if isinstance(mine, nn.Dropout) else 0.0) == (0.0 if layer.kind.is_embedding else p)
        for attr in ("merged", "disable_adapters", "active_adapter", "active_adapters"):
            assert getattr(layer, attr) == getattr(peft_layer, attr), (path, attr)
    return compared


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_layer_attributes_equal_peft_s(pair: Pair):
    ours, theirs = pair.ours(), pair.theirs()
    for name in pair.names:
        set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name)
    assert _assert_layers_match(ours, theirs)
    if pair.other:  # a layer holding both, and one holding only the active one
        ours.set_adapter(["default", "other"])
        theirs.base_model.set_adapter(["default", "other"])
        _assert_layers_match(ours, theirs)
    with ours.disable_adapter(), theirs.disable_adapter():
        _assert_layers_match(ours, theirs)
    if pair.name.startswith("mlp"):
        return  # PEFT's target_parameters layers merge into the weight on their next call only
    ours.merge_adapter()
    theirs.merge_adapter()
    _assert_layers_match(ours, theirs)


def test_views_hold_the_adapter_s_own_tensors_and_add_nothing_to_the_module():
    pair = PAIRS[0]
    ours = pair.ours()
    keys, modules = list(ours.state_dict()), [n for n, _ in ours.named_modules()]
    params = [id(p) for p in ours.parameters()]
    layer, emb = ours.model.lin1, ours.model.emb
    assert layer.lora_A["default"].weight is layer.adapters["default"].lora_A
    assert emb.lora_embedding_B["other"] is emb.adapters["other"].lora_B
    assert layer.lora_dropout["default"] is layer.adapters["default"].dropout
    assert (list(ours.state_dict()), [n for n, _ in ours.named_modules()]) == (keys, modules)
    assert [id(p) for p in ours.parameters()] == params


@pytest.mark.parametrize("pair", PAIRS[:2] + PAIRS[4:], ids=str)
def test_zero_init_through_lora_b_gives_the_base_model_as_in_peft(pair: Pair):
    ours, theirs = pair.ours(), pair.theirs()
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    for layer in [x for _, x in lora_layers(ours.model)] + _peft_layers(theirs):
        for name in layer.lora_B:
            nn.init.zeros_(layer.lora_B[name].weight)
            if layer.lora_B[name].bias is not None:
                nn.init.zeros_(layer.lora_B[name].bias)
        for name in layer.lora_embedding_B:
            nn.init.zeros_(layer.lora_embedding_B[name])
    base = output(pair.build().eval()(**pair.inputs()))
    expected = pair.run(theirs, "default")
    if not pair.config.get("use_dora"):  # DoRA's magnitude still rescales the base weight
        torch.testing.assert_close(expected, base, atol=ATOL, rtol=0)
    torch.testing.assert_close(pair.run(ours, "default"), expected, atol=ATOL, rtol=0)


def _peft_layers(theirs) -> list:
    return [m for m in theirs.modules() if isinstance(m, PeftLoraLayer)]


def test_setting_scaling_takes_effect_as_in_peft():
    pair = PAIRS[0]
    ours, theirs = pair.ours(), pair.theirs()
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    for layer in [x for _, x in lora_layers(ours.model)] + _peft_layers(theirs):
        layer.scaling["default"] = 0.25
    torch.testing.assert_close(pair.run(ours, "default"), pair.run(theirs, "default"), atol=ATOL, rtol=0)
    assert ours.model.lin1.adapters["default"].scale == 0.25
    with pytest.raises(LorakitError, match="finite number"):
        ours.model.lin1.scaling["default"] = float("nan")
    ours.merge_adapter()
    with pytest.raises(LorakitError, match="unmerge_adapter"):
        ours.model.lin1.scaling["default"] = 1.0


def test_settings_fixed_at_creation_are_refused_and_dropout_can_be_swapped():
    ours = PAIRS[0].ours()
    layer = ours.model.lin1
    for attr, value in (("r", 4), ("lora_alpha", 16), ("use_dora", True)):
        with pytest.raises(LorakitError, match=rf"layer\.{attr}\['default'\] cannot be set"):
            getattr(layer, attr)["default"] = value
    with pytest.raises(LorakitError, match="in place"):
        layer.lora_A["default"].weight = nn.Parameter(torch.zeros(8, 36))
    with pytest.raises(LorakitError, match="delete_adapter"):
        del layer.scaling["default"]
    with pytest.raises(KeyError):
        layer.scaling["nope"] = 1.0
    identity = nn.Identity()
    layer.lora_dropout["default"] = identity
    assert layer.adapters["default"].dropout is identity
    with pytest.raises(LorakitError, match="nn.Dropout or nn.Identity"):
        layer.lora_dropout["default"] = nn.ReLU()


# -- load_peft_weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS[:3], ids=str)
def test_load_peft_weights_gives_peft_s_dict_and_loads_through_set(pair: Pair, tmp_path):
    # PEFT's two-step load: load_peft_weights(folder) then set_peft_model_state_dict(model, weights)
    pair.theirs().save_pretrained(tmp_path)
    want = peft.utils.load_peft_weights(str(tmp_path), device="cpu")
    got = lorakit.load_peft_weights(tmp_path, device="cpu")
    _assert_same(got, want)
    ours = get_lora_model(pair.build(), LoraConfig(**pair.config))
    set_peft_model_state_dict(ours, got)
    theirs = peft.PeftModel.from_pretrained(pair.build(), tmp_path).eval()
    torch.testing.assert_close(pair.run(ours.eval(), "default"), pair.run(theirs, "default"), atol=ATOL, rtol=0)


def test_load_peft_weights_key_mapping_and_refusals_as_peft(tmp_path):
    get_lora_model(mlp(), LoraConfig(target_modules=["lin0", "lin1"])).save_pretrained(tmp_path / "sub")
    mapping = {r"^lin0\.": "renamed."}
    want = peft.utils.load_peft_weights(str(tmp_path / "sub"), device="cpu", key_mapping=mapping)
    _assert_same(lorakit.load_peft_weights(tmp_path, device="cpu", key_mapping=mapping, subfolder="sub"), want)
    assert any(".renamed." in k for k in want)
    with pytest.raises(LorakitError, match=r"\['token'\]: lorakit reads local adapter folders"):
        lorakit.load_peft_weights(tmp_path / "sub", token="hf_x")
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(LorakitError, match="pickle file, which lorakit never loads"):
        lorakit.load_peft_weights(tmp_path)


# -- get_ / set_base_model_state_dict --------------------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_base_model_state_dict_has_peft_s_original_keys_and_values(pair: Pair):
    ours, theirs = pair.ours(), pair.theirs()
    want = peft.utils.save_and_load.get_base_model_state_dict(theirs)
    got = lorakit.get_base_model_state_dict(ours)
    _assert_same(got, want)
    assert sorted(got) == sorted(pair.build().state_dict())  # the keys the bare model has


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_set_base_model_state_dict_loads_the_bare_model_s_tensors_as_peft(pair: Pair):
    from peft.utils.save_and_load import set_base_model_state_dict as peft_set

    ours, theirs = pair.ours(), pair.theirs()
    torch.manual_seed(7)
    bare = pair.build()
    with torch.no_grad():
        for param in bare.parameters():  # tied weights stay tied
            param.add_(0.05 * torch.randn_like(param))
    other = bare.state_dict()
    assert not any(lorakit.set_base_model_state_dict(ours, other))
    peft_set(theirs, other)
    _assert_same(lorakit.get_base_model_state_dict(ours), other)  # every tensor of the bare model loaded
    _assert_same(lorakit.get_base_model_state_dict(ours), peft.utils.save_and_load.get_base_model_state_dict(theirs))
    for name in pair.names:
        torch.testing.assert_close(pair.run(ours, name), pair.run(theirs, name), atol=ATOL, rtol=0)


def test_set_base_model_state_dict_strict_names_the_keys_as_peft():
    ours = get_lora_model(mlp(), LoraConfig(target_modules=["lin0"]))
    state = {k: v.clone() for k, v in mlp().state_dict().items()}
    extra = {**state, "nope.weight": torch.zeros(1)}
    del extra["lin1.bias"]
    before = lorakit.get_base_model_state_dict(ours)["lin0.weight"].clone()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \['lin1.bias'\].*\n.*Unexpected key"):
        lorakit.set_base_model_state_dict(ours, {**extra, "lin0.weight": before + 1})
    assert torch.equal(ours.model.lin0.base_layer.weight, before)  # nothing loaded
    result = lorakit.set_base_model_state_dict(ours, extra, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["lin1.bias"], ["nope.weight"])
