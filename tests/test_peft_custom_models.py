"""lorakit against PEFT on the small torch models of PEFT's custom-model tests (tests/test_custom_models.py there):
for each model x LoRA config, the same adapter weights in both libraries give the same outputs, merged or not, and
the same files; both train the same parameters and only those."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import (
    LoraConfig,
    LoraLayer,
    LoraModel,
    TargetError,
    get_lora_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

ATOL = 1e-5


# -- the models: PEFT's, written small ------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, bias: bool = True, norm: bool = False) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10) if norm else nn.Identity()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20) if norm else nn.Identity()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.lin0(self.layernorm0(x))))
        return torch.log_softmax(self.lin1(self.layernorm1(h)), dim=-1)


class DeepMLP(nn.Module):
    """Repeated blocks, for rank_pattern / alpha_pattern / layers_to_transform by layer index."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"lin0": nn.Linear(10, 10), "lin1": nn.Linear(10, 10)}) for _ in range(blocks)
        )
        self.out = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block["lin1"](torch.relu(block["lin0"](x)))
        return torch.log_softmax(self.out(x), dim=-1)


class EmbConv1D(nn.Module):
    """An embedding and transformers' Conv1D (GPT-2's, weight stored in x out)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1d(self.emb(ids))).flatten(1)  # (b, 10)
        return torch.log_softmax(self.lin0(h), dim=-1)


class ConvNet(nn.Module):
    """conv (1-D, 2-D or 3-D, maybe grouped) then a linear head; `shape` is the conv's input per sample."""

    def __init__(self, conv: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.lin_in = nn.Linear(10, int(torch.tensor(shape).prod()))
        self.conv = conv
        with torch.no_grad():
            features = conv(torch.zeros(1, *shape)).numel()
        self.lin0 = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin_in(x).reshape(-1, *self.shape)
        h = torch.tanh(self.conv(h)).flatten(1)  # not relu: a dead one-channel conv would train nothing
        return torch.log_softmax(self.lin0(h), dim=-1)


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.mha(x, x, x)  # unbatched: (9, 10)
        return torch.log_softmax(self.lin0(h), dim=-1)


class LinearUsingParameter(nn.Module):
    """A linear layer written as x @ W + b with W (in x out): only target_parameters can adapt it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.lin1 = LinearUsingParameter(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


def _float_inputs() -> torch.Tensor:
    return torch.randn(9, 10, generator=torch.Generator().manual_seed(1))


def _ids() -> torch.Tensor:
    return torch.arange(90).view(9, 10)


# name -> (build, input): seeded builds, so every call gives the same base weights
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "MLP": (MLP, _float_inputs),
    "MLPNoBias": (lambda: MLP(bias=False), _float_inputs),
    "MLP_LayerNorm": (lambda: MLP(norm=True), _float_inputs),
    "DeepMLP": (DeepMLP, _float_inputs),
    "EmbConv1D": (EmbConv1D, _ids),
    "Conv1d": (lambda: ConvNet(nn.Conv1d(1, 1, 2), (1, 10)), _float_inputs),
    "Conv1dKernel1": (lambda: ConvNet(nn.Conv1d(3, 10, 1), (3, 10)), _float_inputs),
    "Conv1dGroups": (lambda: ConvNet(nn.Conv1d(8, 8, 3, groups=2), (8, 10)), _float_inputs),
    "Conv2d": (lambda: ConvNet(nn.Conv2d(5, 10, 3), (5, 3, 3)), _float_inputs),
    "Conv2d1x1": (lambda: ConvNet(nn.Conv2d(1, 10, 1), (1, 3, 3)), _float_inputs),
    "Conv2dGroups": (lambda: ConvNet(nn.Conv2d(16, 16, 3, groups=8), (16, 3, 3)), _float_inputs),
    "Conv2dGroups2": (lambda: ConvNet(nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 4, 4)), _float_inputs),
    "Conv3d": (lambda: ConvNet(nn.Conv3d(5, 10, 3), (5, 3, 3, 3)), _float_inputs),
    "MHA": (MHA, _float_inputs),
    "MlpUsingParameters": (MlpUsingParameters, _float_inputs),
}


@dataclass
class Custom:
    name: str
    model: str  # a key of MODELS
    config: dict[str, Any] = field(default_factory=dict)
    mergeable: bool = True  # False: PEFT refuses to merge it too (grouped convs)

    def __str__(self) -> str:
        return self.name

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return MODELS[self.model][0]()

    def inputs(self) -> torch.Tensor:
        return MODELS[self.model][1]()

    def run(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(self.inputs())


GROUPED = {"mergeable": False}
CASES = [
    Custom("mlp-lin0-regex", "MLP", {"target_modules": "lin0"}),
    Custom("mlp-lin1", "MLP", {"target_modules": ["lin1"]}),
    Custom("mlp-both", "MLP", {"target_modules": ["lin0", "lin1"]}),
    Custom("mlp-modules_to_save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Custom("mlp-alpha-dropout", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    Custom("mlp-dora", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    Custom("mlp-dora-both", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    Custom("mlp-dora-alpha", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    Custom("mlp-rslora", "MLP", {"target_modules": ["lin0", "lin1"], "use_rslora": True, "lora_alpha": 6}),
    Custom("mlp-gaussian", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "gaussian"}),
    Custom("mlp-lora-bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    Custom("mlp-no-bias", "MLPNoBias", {"target_modules": ["lin0", "lin1"], "r": 4}),
    Custom(
        "mlp-layernorm-saved",
        "MLP_LayerNorm",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["layernorm0", "layernorm1"]},
    ),
    Custom(
        "deep-patterns",
        "DeepMLP",
        {
            "target_modules": ["lin0", "lin1"],
            "rank_pattern": {"layers.0.lin0": 2, r"layers\.2\.lin\d": 5},
            "alpha_pattern": {"layers.1.lin1": 3, "lin0": 12},
        },
    ),
    Custom(
        "deep-layers",
        "DeepMLP",
        {"target_modules": ["lin0"], "layers_to_transform": [0, 2], "layers_pattern": "layers", "r": 3},
    ),
    Custom("deep-exclude", "DeepMLP", {"target_modules": r".*lin\d", "exclude_modules": ["layers.1.lin1"]}),
    Custom("emb-conv1d-conv1d", "EmbConv1D", {"target_modules": ["conv1d"]}),
    Custom("emb-conv1d-emb", "EmbConv1D", {"target_modules": ["emb"]}),
    Custom("emb-conv1d-both", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    Custom("emb-conv1d-dora", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    Custom("emb-conv1d-emb-dora", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    Custom("emb-conv1d-both-dora", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    Custom(
        "emb-conv1d-tokens", "EmbConv1D", {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}
    ),
    Custom("conv1d", "Conv1d", {"target_modules": ["conv"]}),
    Custom("conv1d-dora", "Conv1d", {"target_modules": ["conv"], "use_dora": True}),
    Custom("conv1d-kernel1", "Conv1dKernel1", {"target_modules": ["conv"]}),
    Custom("conv1d-groups", "Conv1dGroups", {"target_modules": ["conv"]}, **GROUPED),
    Custom("conv2d", "Conv2d", {"target_modules": ["conv"]}),
    Custom("conv2d-lin", "Conv2d", {"target_modules": ["conv", "lin0"]}),
    Custom("conv2d-dora", "Conv2d", {"target_modules": ["conv"], "use_dora": True}),
    Custom("conv2d-lin-dora", "Conv2d", {"target_modules": ["conv", "lin0"], "use_dora": True}),
    Custom("conv2d-lora-bias", "Conv2d", {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}),
    Custom("conv2d-1x1", "Conv2d1x1", {"target_modules": ["conv"]}),
    Custom("conv2d-1x1-dora", "Conv2d1x1", {"target_modules": ["conv"], "use_dora": True}),
    Custom("conv2d-groups", "Conv2dGroups", {"target_modules": ["conv"]}, **GROUPED),
    Custom("conv2d-groups2", "Conv2dGroups2", {"target_modules": ["conv"]}, **GROUPED),
    Custom("conv3d", "Conv3d", {"target_modules": ["conv"]}),
    Custom("conv3d-lin", "Conv3d", {"target_modules": ["conv", "lin0"]}),
    Custom("conv3d-dora", "Conv3d", {"target_modules": ["conv"], "use_dora": True}),
    Custom("conv3d-lin-dora", "Conv3d", {"target_modules": ["conv", "lin0"], "use_dora": True}),
    Custom("conv3d-lora-bias", "Conv3d", {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}),
    Custom("mha", "MHA", {"target_modules": ["mha"]}),
    Custom("mha-lin", "MHA", {"target_modules": ["mha", "lin0"]}),
    Custom("parameters", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    Custom("parameters-and-modules", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]


# -- building both sides ---------------------------------------------------------------------------------------------
def _perturb(model: nn.Module, seed: int) -> None:
    """Every trainable tensor moved off its init (as if trained), so B, lora_bias, DoRA's magnitude, saved modules
    and token rows all count in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _peft_mha_out_proj_at_zero(theirs: nn.Module) -> None:
    """PEFT 0.21 adds an MHA's out_proj delta twice (huggingface/peft#3774, docs/variants.md): compared at B = 0."""
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if name.endswith("out_proj") and hasattr(module, "lora_B"):
                for b in module.lora_B.values():
                    b.weight.zero_()


def _pair(case: Custom, seed: int = 3) -> tuple[LoraModel, nn.Module]:
    """(ours, theirs): the case's config in both libraries, PEFT's adapter weights (moved off init) copied into
    lorakit."""
    config = {**case.config, "init_lora_weights": case.config.get("init_lora_weights", False)}
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(**config))
    _perturb(theirs, seed)
    _peft_mha_out_proj_at_zero(theirs)
    ours = get_lora_model(case.build(), LoraConfig(**config))
    loaded = set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not loaded.missing_keys
    return ours, theirs


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Custom:
    return request.param


# -- the checks ------------------------------------------------------------------------------------------------------
def test_same_weights_give_peft_s_outputs_and_trainable_counts(case: Custom):
    ours, theirs = _pair(case)
    expected = case.run(theirs)
    assert not torch.allclose(expected, case.run(case.build()), atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(case.run(ours), expected, atol=ATOL, rtol=0)
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))
    counts = ours.train().get_nb_trainable_parameters()
    assert counts == theirs.train().get_nb_trainable_parameters()
    with ours.disable_adapter():
        torch.testing.assert_close(case.run(ours), case.run(case.build()), atol=ATOL, rtol=0)
    torch.testing.assert_close(case.run(ours), expected, atol=ATOL, rtol=0)
    assert ours.get_nb_trainable_parameters() == counts  # the block's end restores what trains


def test_layers_show_peft_s_in_and_out_features(case: Custom):
    ours, theirs = _pair(case)

    def features(model: nn.Module, prefix: str, layer_class: type) -> dict[str, tuple[int, int]]:
        return {
            name.removeprefix(prefix): (layer.in_features, layer.out_features)
            for name, layer in model.named_modules()
            if isinstance(layer, layer_class) and layer.r  # LoRA adapters only, not token rows
        }

    expected = features(theirs, "base_model.model.", PeftLoraLayer)
    assert expected
    assert features(ours, "model.", LoraLayer) == expected


def test_merge_unmerge_and_merge_and_unload_keep_the_outputs(case: Custom):
    if not case.mergeable:
        pytest.skip("PEFT cannot merge a grouped conv either")
    ours, _ = _pair(case)
    expected = case.run(ours)
    before = {name: p.clone() for name, p in ours.named_parameters()}
    ours.merge_adapter()
    torch.testing.assert_close(case.run(ours), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(case.run(ours), expected, atol=ATOL, rtol=0)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0, msg=name)
    merged = ours.merge_and_unload(safe_merge=True)
    assert not any("lora" in name or "adapters" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(case.run(merged), expected, atol=ATOL, rtol=0)


def test_unload_gives_the_base_model_back(case: Custom):
    ours, _ = _pair(case)
    torch.testing.assert_close(case.run(ours.unload()), case.run(case.build()), atol=ATOL, rtol=0)


def test_files_load_both_ways(case: Custom, tmp_path):
    ours, theirs = _pair(case)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(case.build(), tmp_path / "ours")
    _peft_mha_out_proj_at_zero(back)
    torch.testing.assert_close(case.run(back), case.run(ours), atol=ATOL, rtol=0)
    loaded = LoraModel.from_pretrained(case.build(), tmp_path / "theirs")
    torch.testing.assert_close(case.run(loaded), case.run(theirs), atol=ATOL, rtol=0)


def _step_changes(model: nn.Module, inputs: torch.Tensor, atol: float) -> tuple[set[str], set[str]]:
    """One SGD step on sum(output): (names of trainable parameters, names of parameters it moved by more than atol)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(inputs).sum().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.allclose(p, before[name], atol=atol, rtol=0)}
    return {name for name, p in model.named_parameters() if p.requires_grad}, changed


def test_one_step_changes_only_the_adapter_in_both(case: Custom):
    """lorakit leaves every frozen weight bit for bit; PEFT's MHA layer adds and subtracts dW in each forward, which
    moves the frozen weights by a rounding step (3e-8 here)."""
    ours, theirs = _pair(case)
    for model, atol in ((ours, 0.0), (theirs, 1e-6)):
        _perturb(model, 7)  # every factor non-zero (an MHA's out_proj B too), so every one gets a gradient
        trainable, changed = _step_changes(model, case.inputs(), atol)
        assert changed == trainable, type(model).__name__


def test_a_second_adapter_switches_and_deletes_as_in_peft(case: Custom):
    if case.config.get("target_parameters"):
        pytest.skip("PEFT 0.21 refuses a second adapter with target_parameters")
    ours, theirs = _pair(case)
    config = {**case.config, "init_lora_weights": False, "r": 16, "rank_pattern": {}}  # 16: grouped convs' rank
    theirs.add_adapter("other", peft.LoraConfig(**config))
    _perturb(theirs, 5)
    _peft_mha_out_proj_at_zero(theirs)
    ours.add_adapter("other", LoraConfig(**config))
    for name in ("default", "other"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert not set_peft_model_state_dict(ours, state, adapter_name=name).missing_keys
    theirs.set_adapter("other")
    ours.set_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    torch.testing.assert_close(case.run(ours), case.run(theirs), atol=ATOL, rtol=0)
    theirs.delete_adapter("default")
    ours.delete_adapter("default")
    assert list(ours.peft_config) == list(theirs.peft_config) == ["other"]
    assert not [name for name, _ in ours.named_parameters() if ".default." in name]  # nothing of it left behind
    torch.testing.assert_close(case.run(ours), case.run(theirs), atol=ATOL, rtol=0)
    assert ours.train().get_nb_trainable_parameters() == theirs.train().get_nb_trainable_parameters()


def test_saving_one_adapter_ignores_adapters_whose_names_contain_its_name(tmp_path):
    """PEFT's adapter-name-substring check: save_pretrained(selected_adapters=["default"]) writes default's tensors
    only, whatever the other adapters are called."""
    case = next(c for c in CASES if c.name == "conv2d-lin-dora")
    ours = get_lora_model(case.build(), LoraConfig(**case.config))
    expected = set(get_peft_model_state_dict(ours))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        ours.add_adapter(name, LoraConfig(**case.config))
    ours.save_pretrained(tmp_path, selected_adapters=["default"])
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == expected


def _token_rows_at_random(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def test_token_adapters_on_one_table_active_together_give_peft_s_layer_outputs():
    """Two adapters' token rows on one embedding (disjoint ids): each alone, and both active, give what PEFT's
    layers give (PEFT's model-level set_adapter refuses the pair; its layers take it, as its own tests set it).
    lorakit adds each adapter's change to the table, so each row holds its adapter's values."""
    case = next(c for c in CASES if c.name == "emb-conv1d-tokens")
    first = {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [0, 1, 2]}}
    second = {**first, "target_modules": ["conv1d"], "trainable_token_indices": {"emb": [3, 4, 5, 6]}}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(**first))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    _token_rows_at_random(theirs, 1)
    ours = get_lora_model(case.build(), LoraConfig(**first))
    ours.add_adapter("other", LoraConfig(**second))
    for name in ("default", "other"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert not set_peft_model_state_dict(ours, state, adapter_name=name).missing_keys
    for names in (["default"], ["other"], ["default", "other"]):
        for module in theirs.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.set_adapter(names)
        ours.set_adapter(names)
        torch.testing.assert_close(case.run(ours), case.run(theirs), atol=ATOL, rtol=0, msg=str(names))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        theirs.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_token_ids_as_a_list_reach_the_input_embedding_already_wrapped_by_an_earlier_adapter(how, tmp_path):
    """trainable_token_indices=[ids] means get_input_embeddings(); once an earlier adapter's tokens wrap that table,
    it returns the wrapper, which lorakit did not recognise (a TargetError). PEFT takes it; so does lorakit now,
    with PEFT's outputs."""
    from tests.cases import tiny_llama

    first = {"target_modules": ["q_proj"], "init_lora_weights": False, "trainable_token_indices": [1, 2]}
    second = {"target_modules": ["v_proj"], "init_lora_weights": False, "trainable_token_indices": [3, 5]}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**first))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    _token_rows_at_random(theirs, 1)
    ours = get_lora_model(tiny_llama(), LoraConfig(**first))
    if how == "add_adapter":
        ours.add_adapter("other", LoraConfig(**second))
        state = peft.get_peft_model_state_dict(theirs, adapter_name="other")
        assert not set_peft_model_state_dict(ours, state, adapter_name="other").missing_keys
    else:
        theirs.save_pretrained(tmp_path, selected_adapters=["other"])
        ours.load_adapter(tmp_path / "other", "other")
    state = peft.get_peft_model_state_dict(theirs, adapter_name="default")
    assert not set_peft_model_state_dict(ours, state).missing_keys
    ids = torch.tensor([[1, 3, 5, 7]])
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model", ["Conv2dGroups", "Conv1dGroups"])
def test_dora_on_a_grouped_conv_is_refused_where_peft_computes_another_norm(model: str, tmp_path):
    """DoRA scales each output channel by m / ||W + dW||. A grouped conv's dW is dense (B's rank groups read every
    input channel through A), so it has no place in the grouped weight; PEFT 0.21 reshapes B @ A into the
    grouped weight's shape and takes the norm of that, which is not W + dW. lorakit refuses, when the adapter is
    made and when PEFT's folder is loaded, naming the fix."""
    case = Custom(model, model)
    config = {"target_modules": ["conv"], "use_dora": True, "r": 8}
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(**config))  # accepted there
    theirs.save_pretrained(tmp_path)
    message = r"dora needs each layer's dW, which \['conv'\] cannot form \(convolutions with groups > 1\)"
    with pytest.raises(TargetError, match=message):
        get_lora_model(case.build(), LoraConfig(**config))
    with pytest.raises(TargetError, match=message):
        LoraModel.from_pretrained(case.build(), tmp_path)
    plain = get_lora_model(case.build(), LoraConfig(**{**config, "use_dora": False}))  # the fix the message names
    assert plain.get_nb_trainable_parameters()[0] > 0
