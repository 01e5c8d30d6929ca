"""lorakit.hotswap: PEFT's compiled hot-swap flow (prepare, compile, swap folders) run with lorakit's functions gives
PEFT's outputs, never recompiles, and refuses what PEFT refuses."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

from lorakit import LoraConfig, LorakitError, LoraModel, get_lora_model
from lorakit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tests.cases import mlp

ATOL = 1e-5
ADAPTERS = [  # every swap changes the rank and the scale; PEFT refuses a swap to another use_rslora, lorakit not
    dict(r=4, lora_alpha=8),
    dict(r=2, lora_alpha=5),
    dict(r=8, lora_alpha=3),
    dict(r=6, lora_alpha=3, use_rslora=True, alpha_pattern={"lin1": 7}),
    dict(r=4, lora_alpha=8, lora_dropout=0.1),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    for seed, config in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        lora = LoraConfig(init_lora_weights=False, target_modules=["lin0", "lin1"], **config)
        get_lora_model(mlp(), lora).save_pretrained(root / str(seed))
    return [root / str(i) for i in range(len(ADAPTERS))]


def _peft_flow(folders, x):
    model = peft.PeftModel.from_pretrained(mlp(), folders[0]).eval()
    peft_prepare(model, target_rank=8)
    outputs = [model(x)]
    for folder in folders[1:3]:
        peft_hotswap_adapter(model, str(folder), adapter_name="default", torch_device="cpu")
        outputs.append(model(x))
    return outputs


def test_prepare_compile_swap_gives_peft_outputs_without_a_recompile(folders):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _peft_flow(folders, x)
        model = LoraModel.from_pretrained(mlp(), folders[0]).eval()
        prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
        assert model.peft_config["default"].r == 8
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        got = [compiled(x)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for folder in folders[1:3]:
                hotswap_adapter(compiled, str(folder), adapter_name="default", torch_device="cpu")
                got.append(compiled(x))
            hotswap_adapter(compiled, folders[3], "default")  # rsLoRA and an alpha pattern: exact here
            rslora = compiled(x)
            hotswap_adapter(compiled, folders[0], "default")  # and back
            got.append(compiled(x))
        expected = LoraModel.from_pretrained(mlp(), folders[3]).eval()(x)
    torch._dynamo.reset()
    for ours, theirs in zip(got, [*want, want[0]], strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(rslora, expected, atol=ATOL, rtol=0)


def test_config_ranks_are_set_to_the_target_as_peft_sets_them():
    config = {"a": LoraConfig(r=4, rank_pattern={"lin1": 2}), "b": LoraConfig(r=2)}
    theirs = {"a": peft.LoraConfig(r=4, rank_pattern={"lin1": 2}), "b": peft.LoraConfig(r=2)}
    torch.manual_seed(0)
    model = get_lora_model(mlp(), LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False))
    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(target_modules=["lin0"], r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=16, config=config)
    peft_prepare(peft_model, target_rank=16, config=theirs)
    for name in config:
        assert (config[name].r, config[name].rank_pattern) == (theirs[name].r, theirs[name].rank_pattern)


def test_what_peft_refuses_is_refused_with_the_fix(folders):
    model = LoraModel.from_pretrained(mlp(), folders[0]).eval()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(LorakitError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    with pytest.raises(LorakitError, match="check_compiled must be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="raise")
    with pytest.raises(LorakitError, match="no adapter"):
        prepare_model_for_compiled_hotswap(LoraModel(mlp()))
    with pytest.raises(LorakitError, match="takes a LoraModel"):
        prepare_model_for_compiled_hotswap(mlp())
    with pytest.raises(LorakitError, match=r"\['revision'\]: lorakit reads local adapter folders"):
        hotswap_adapter(model, folders[1], "default", revision="main")
    with pytest.raises(LorakitError, match="rank must be an integer >= 8"):
        prepare_model_for_compiled_hotswap(LoraModel.from_pretrained(mlp(), folders[2]), target_rank=4)
    if not torch.cuda.is_available():
        with pytest.raises(LorakitError, match="torch_device='cuda'"):
            hotswap_adapter(model, folders[1], "default", torch_device="cuda")
    before = model(torch.ones(1, 6))
    with pytest.raises(LorakitError, match="nope"):
        hotswap_adapter(model, folders[1], "nope")
    with pytest.raises(LorakitError, match="lora_dropout=0.1"):
        hotswap_adapter(model, folders[4], "default")
    with pytest.raises(ValueError, match="lora_dropout"):  # PEFT's own refusal of the same swap
        peft_hotswap_adapter(peft.PeftModel.from_pretrained(mlp(), folders[0]), str(folders[4]), "default")
    torch.testing.assert_close(model(torch.ones(1, 6)), before, atol=0, rtol=0)  # nothing changed


def test_subfolder_is_read_as_peft_reads_it(folders, tmp_path):
    model = LoraModel.from_pretrained(mlp(), folders[0]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, folders[1].parent, "default", subfolder=folders[1].name)
    x = torch.randn(2, 6)
    with torch.no_grad():
        expected = LoraModel.from_pretrained(mlp(), folders[1]).eval()(x)
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


def test_an_adapter_that_cannot_be_prepared_leaves_every_adapter_as_it_was(folders):
    model = LoraModel.from_pretrained(mlp(), folders[0]).eval()
    model.load_adapter(folders[2], "big")  # rank 8: a target of 4 cannot hold it
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(LorakitError, match="rank must be an integer >= 8"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.peft_config["default"].lora_alpha == 8  # "default" fits rank 4, yet was not converted either
    model.add_adapter("dora", LoraConfig(target_modules=["lin0"], use_dora=True))
    with pytest.raises(LorakitError, match="'dora' is not plain LoRA"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.peft_config["default"].lora_alpha == 8
