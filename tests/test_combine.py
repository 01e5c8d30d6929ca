"""add_weighted_adapter gives PEFT's combined delta weights and outputs; random types are seeded; bad input is refused
before anything changes."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import merge_utils

from lorakit import LoraConfig, LorakitError, LoraModel, get_lora_model
from lorakit.inject import lora_layers
from lorakit.multi import combine
from tests.cases import conv_mlp, ids_input, output, positional, tiny_gpt2, tiny_llama

ATOL = 1e-5
DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
LLAMA = {  # two target sets that overlap: the union, and layers only one adapter has
    "fr": {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8},
    "de": {"target_modules": ["q_proj", "up_proj"], "r": 4, "lora_alpha": 3},
}
GPT2 = {  # GPT-2's Conv1D stores (in x out); the embedding's A is looked up by token id
    "fr": {"target_modules": ["c_attn", "wte"], "r": 4, "lora_alpha": 6},
    "de": {"target_modules": ["c_attn", "wte"], "r": 4, "lora_alpha": 2},
}
CONV = {  # PEFT's svd path handles Conv2d (flattened kernel), not Conv1d, so conv1 stays out
    "fr": {"target_modules": ["emb", "conv2", "lin1"], "r": 3, "lora_alpha": 5},
    "de": {"target_modules": ["emb", "conv2", "lin1"], "r": 3, "lora_alpha": 2},
}
MODELS = {
    "llama": (tiny_llama, ids_input(64), LLAMA),
    "gpt2": (tiny_gpt2, ids_input(64), GPT2),
    "conv": (conv_mlp, positional(ids_input(20)), CONV),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: extra threads only add overhead, and on a busy shared CPU an SVD of 32 x 96 took
    200 ms with 2 threads against 0.2 ms with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(build, configs: dict[str, dict], tmp_path) -> tuple[LoraModel, peft.PeftModel]:
    """The same random adapters in PEFT and in lorakit (through PEFT's files)."""
    torch.manual_seed(7)
    theirs = None
    for name, config in configs.items():
        config = peft.LoraConfig(init_lora_weights=False, **config)
        if theirs is None:
            theirs = peft.get_peft_model(build(), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel(build())
    for name in configs:
        ours.load_adapter(tmp_path / name, name)
    return ours.eval(), theirs.eval()


def _our_deltas(model: LoraModel, name: str) -> dict[str, torch.Tensor]:
    return {p: layer.adapters[name].delta_weight() for p, layer in lora_layers(model.model) if name in layer.adapters}


def _their_deltas(model: peft.PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {
        path: module.get_delta_weight(name)
        for path, module in model.base_model.model.named_modules()
        if isinstance(module, PeftLoraLayer) and (name in module.lora_A or name in module.lora_embedding_A)
    }


def _assert_same_deltas(ours: LoraModel, theirs: peft.PeftModel, name: str) -> None:
    mine, peft_deltas = _our_deltas(ours, name), _their_deltas(theirs, name)
    assert sorted(mine) == sorted(peft_deltas)
    for path, delta in peft_deltas.items():
        torch.testing.assert_close(mine[path], delta, atol=ATOL, rtol=ATOL, msg=path)
    assert any(d.abs().max() > 1e-3 for d in mine.values()), "the combination must not be empty"


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_deterministic_types_give_peft_delta_weights(model, combination_type, tmp_path):
    build, _, configs = MODELS[model]
    ours, theirs = _pair(build, configs, tmp_path)
    kwargs = {"density": 0.4} if "prune" in combination_type or "ties" in combination_type else {}
    theirs.add_weighted_adapter(["fr", "de"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
    ours.add_weighted_adapter(["fr", "de"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
    _assert_same_deltas(ours, theirs, "mix")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_combined_adapter_gives_peft_outputs(model, tmp_path):
    build, inputs, configs = MODELS[model]
    ours, theirs = _pair(build, configs, tmp_path)
    for m in (ours, theirs):
        m.add_weighted_adapter(["fr", "de"], [1.0, 0.5], "mix", combination_type="cat")
        m.set_adapter("mix")
    with torch.no_grad():
        expected = output(theirs(**inputs()))
        torch.testing.assert_close(output(ours(**inputs())), expected, atol=ATOL, rtol=0)
        assert not torch.allclose(expected, output(build().eval()(**inputs())), atol=1e-4)


def test_cat_is_the_exact_weighted_sum_of_deltas(tmp_path):
    ours, _ = _pair(tiny_llama, {"fr": LLAMA["fr"], "de": {**LLAMA["de"], "r": 6}}, tmp_path)
    ours.add_weighted_adapter(["fr", "de"], [0.3, 2.0], "mix", combination_type="cat")
    fr, de, mix = (_our_deltas(ours, n) for n in ("fr", "de", "mix"))
    for path, delta in mix.items():
        expected = 0.3 * fr.get(path, 0.0) + 2.0 * de.get(path, 0.0)
        torch.testing.assert_close(delta.double(), torch.as_tensor(expected).double(), atol=1e-5, rtol=0)
    assert ours.peft_config["mix"].r == 10 and ours.peft_config["mix"].lora_alpha == 10


def test_rslora_adapters_combine_to_the_exact_sum(tmp_path):
    """The new adapter has scale 1 whatever the sources' scaling; PEFT keeps use_rslora, so its cat is sqrt(r) off."""
    rslora = {name: {**config, "use_rslora": True} for name, config in LLAMA.items()}
    ours, theirs = _pair(tiny_llama, rslora, tmp_path)
    for m in (ours, theirs):
        m.add_weighted_adapter(["fr", "de"], [1.0, 1.0], "mix", combination_type="cat")
    fr, de, mix = (_our_deltas(ours, n) for n in ("fr", "de", "mix"))
    peft_mix = _their_deltas(theirs, "mix")
    for path, delta in mix.items():
        torch.testing.assert_close(delta, fr.get(path, 0.0) + de.get(path, 0.0), atol=ATOL, rtol=0)
        torch.testing.assert_close(peft_mix[path], delta * 8**0.5, atol=1e-4, rtol=1e-4)  # r = 4 + 4


def test_svd_of_different_ranks_and_svd_rank_match_peft(tmp_path):
    configs = {"fr": LLAMA["fr"], "de": {**LLAMA["de"], "r": 6}}
    ours, theirs = _pair(tiny_llama, configs, tmp_path)
    for m in (ours, theirs):
        m.add_weighted_adapter(["fr", "de"], [1.0, 1.0], "low", combination_type="svd", svd_rank=3, svd_clamp=0.9)
    _assert_same_deltas(ours, theirs, "low")
    assert {layer.adapters["low"].r for _, layer in lora_layers(ours.model) if "low" in layer.adapters} == {3}


def test_svd_rank_above_a_layers_size_is_the_exact_sum(tmp_path):
    """svd_rank 40 > min(out, in) = 32 of tiny Llama's q_proj: every singular vector kept, the rest zero padding."""
    ours, _ = _pair(tiny_llama, LLAMA, tmp_path)
    ours.add_weighted_adapter(["fr", "de"], [0.5, -1.5], "full", combination_type="svd", svd_rank=40)
    fr, de, full = (_our_deltas(ours, n) for n in ("fr", "de", "full"))
    for path, delta in full.items():
        torch.testing.assert_close(delta, 0.5 * fr.get(path, 0.0) - 1.5 * de.get(path, 0.0), atol=ATOL, rtol=0)


def test_single_adapter_is_scaled_linearly_as_in_peft(tmp_path):
    ours, theirs = _pair(tiny_llama, {"fr": LLAMA["fr"]}, tmp_path)
    for m in (ours, theirs):
        m.add_weighted_adapter(["fr"], [-2.0], "neg", combination_type="svd")
    _assert_same_deltas(ours, theirs, "neg")


def test_frequency_sign_election_matches_peft(tmp_path):
    ours, theirs = _pair(tiny_llama, LLAMA, tmp_path)
    for m in (ours, theirs):
        m.add_weighted_adapter(["fr", "de"], [1.0, 0.6], "t", "ties_svd", density=0.5, majority_sign_method="frequency")
    _assert_same_deltas(ours, theirs, "t")


@pytest.mark.parametrize("rule", ["dare_linear", "dare_ties", "ties", "magnitude_prune"])
def test_merge_rules_equal_peft_merge_utils(rule):
    """The per-tensor rules, dare's random masks included: the same seed draws the same mask as PEFT's."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    weights = [0.5, -1.2, 0.8]
    args = (0.3,) if rule in ("dare_linear", "magnitude_prune") else (0.3, "total")
    torch.manual_seed(11)
    expected = getattr(merge_utils, rule)(tensors, torch.tensor(weights), *args)
    how = combine.Combination(rule, tuple(weights), 4, density=0.3, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(combine._MERGES[rule](tensors, weights, how), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_random_types_repeat_with_a_seed(combination_type, tmp_path):
    ours, _ = _pair(tiny_llama, LLAMA, tmp_path)
    for name, seed in (("s1", 3), ("s2", 3), ("s3", 4)):
        ours.add_weighted_adapter(["fr", "de"], [1.0, 0.5], name, combination_type, density=0.5, seed=seed)
    s1, s2, s3 = (_our_deltas(ours, n) for n in ("s1", "s2", "s3"))
    for path in s1:
        torch.testing.assert_close(s1[path], s2[path], atol=0, rtol=0)
    assert any(not torch.equal(s1[p], s3[p]) for p in s1), "another seed drops other entries"


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties_svd"])
def test_random_types_under_torchs_global_seed_give_peft_adapter(combination_type, tmp_path):
    """seed=None draws from torch's generator as PEFT does, after creating the new factors as PEFT does (here with
    the sources' init_lora_weights=False, which PEFT's combined adapter inherits): the same masks, PEFT's deltas."""
    ours, theirs = _pair(tiny_llama, LLAMA, tmp_path)
    for m in (ours, theirs):
        torch.manual_seed(5)
        m.add_weighted_adapter(["fr", "de"], [0.7, -0.4], "mix", combination_type, density=0.5)
    _assert_same_deltas(ours, theirs, "mix")


def test_numpy_and_tensor_weights_combine_as_in_peft(tmp_path):
    import numpy as np

    ours, theirs = _pair(tiny_llama, LLAMA, tmp_path)
    for weights in ([np.float32(0.7), np.float64(-0.4)], torch.tensor([0.7, -0.4])):
        for m in (ours, theirs):
            m.add_weighted_adapter(["fr", "de"], weights, f"mix{type(weights).__name__}", "ties", density=0.5)
        _assert_same_deltas(ours, theirs, f"mix{type(weights).__name__}")


def test_dare_keeping_everything_is_linear(tmp_path):
    ours, _ = _pair(tiny_llama, LLAMA, tmp_path)
    ours.add_weighted_adapter(["fr", "de"], [1.0, 0.5], "dare", "dare_linear", density=1.0, seed=0)
    ours.add_weighted_adapter(["fr", "de"], [1.0, 0.5], "lin", "linear")
    dare, lin = _our_deltas(ours, "dare"), _our_deltas(ours, "lin")
    for path in lin:
        torch.testing.assert_close(dare[path], lin[path], atol=0, rtol=0)


# -- bad input: one clear error, the model as it was ---------------------------------------------------


def _snapshot(model: LoraModel) -> tuple[list[str], dict[str, torch.Tensor]]:
    return sorted(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: LoraModel, before) -> None:
    names, state = _snapshot(model)
    assert names == before[0] and sorted(state) == sorted(before[1])
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def _model_with(configs: dict[str, LoraConfig]) -> LoraModel:
    torch.manual_seed(0)
    model = LoraModel(tiny_llama())
    for name, config in configs.items():
        model.add_adapter(name, config)
    return model


BAD_CALLS = {
    "unknown adapter": (dict(adapters=["fr", "zz"], weights=[1, 1]), "unknown adapter"),
    "weights length": (dict(adapters=["fr", "de"], weights=[1.0]), "2 adapters but 1 weights"),
    "no adapters": (dict(adapters=[], weights=[]), "at least one"),
    "nan weight": (dict(adapters=["fr", "de"], weights=[1.0, float("nan")]), "finite"),
    "existing name": (dict(adapters=["fr", "de"], weights=[1, 1], adapter_name="fr"), "exists already"),
    "unknown type": (dict(adapters=["fr", "de"], weights=[1, 1], combination_type="mean"), "unknown combination_type"),
    "ties without density": (dict(adapters=["fr", "de"], weights=[1, 1], combination_type="ties"), "density"),
    "density above 1": (dict(adapters=["fr", "de"], weights=[1, 1], combination_type="ties", density=1.5), "density"),
    "dare density 0": (dict(adapters=["fr", "de"], weights=[1, 1], combination_type="dare_linear", density=0), "> 0"),
    "sign method": (
        dict(adapters=["fr", "de"], weights=[1, 1], combination_type="ties", density=0.5, majority_sign_method="x"),
        "majority_sign_method",
    ),
    "linear, other rank": (dict(adapters=["fr", "r8"], weights=[1, 1], combination_type="linear"), "same rank"),
    "ties, rank_pattern": (
        dict(adapters=["fr", "pattern"], weights=[1, 1], combination_type="ties", density=0.5),
        "equal ranks in every layer",
    ),
    "list and regex": (dict(adapters=["fr", "regex"], weights=[1, 1], combination_type="cat"), "one kind"),
    "dora": (dict(adapters=["fr", "dora"], weights=[1, 1], combination_type="svd"), "DoRA"),
    "modules_to_save": (dict(adapters=["fr", "head"], weights=[1, 1], combination_type="svd"), "modules_to_save"),
    "layer selection": (dict(adapters=["fr", "layer1"], weights=[1, 1], combination_type="svd"), "layer selection"),
    "svd_rank": (dict(adapters=["fr", "de"], weights=[1, 1], svd_rank=0), "svd_rank"),
    "svd_clamp": (dict(adapters=["fr", "de"], weights=[1, 1], svd_clamp=1.5), "quantile"),
    "svd_driver on CPU": (dict(adapters=["fr", "de"], weights=[1, 1], svd_driver="gesvdj"), "CUDA tensors only"),
    "one name as a string": (dict(adapters="fr", weights=[1.0]), r"a list of adapter names, got 'fr'; e.g. \['fr'\]"),
    "no weights": (dict(adapters=["fr", "de"], weights=None), "weights must be a list of numbers"),
    "density as text": (dict(adapters=["fr", "de"], weights=[1, 1], combination_type="ties", density="0.5"), "density"),
    "density as a bool": (
        dict(adapters=["fr", "de"], weights=[1, 1], combination_type="ties", density=True),
        "density",
    ),
    "svd_clamp as text": (dict(adapters=["fr", "de"], weights=[1, 1], svd_clamp="0.9"), "quantile"),
    "seed as text": (
        dict(adapters=["fr", "de"], weights=[1, 1], combination_type="dare_linear", density=0.5, seed="0"),
        "seed must be an integer",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_and_changes_nothing(case):
    call, message = BAD_CALLS[case]
    model = _model_with(
        {
            "fr": LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False),
            "de": LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False),
            "r8": LoraConfig(target_modules=["q_proj"], r=8),
            "pattern": LoraConfig(target_modules=["q_proj"], r=4, rank_pattern={"layers.1.self_attn.q_proj": 2}),
            "regex": LoraConfig(target_modules=r".*\.k_proj", r=4),
            "dora": LoraConfig(target_modules=["q_proj"], r=4, use_dora=True),
            "head": LoraConfig(target_modules=["q_proj"], r=4, modules_to_save=["lm_head"]),
            "layer1": LoraConfig(target_modules=["k_proj"], r=4, layers_to_transform=[1]),
        }
    )
    before = _snapshot(model)
    with pytest.raises(LorakitError, match=message):
        model.add_weighted_adapter(**{"adapter_name": "mix", **call})
    _assert_unchanged(model, before)


def test_target_parameters_adapters_are_refused():
    from tests.cases import mha_block

    model = get_lora_model(mha_block(), LoraConfig(target_modules=["out"], target_parameters=["attn.in_proj_weight"]))
    before = _snapshot(model)
    with pytest.raises(LorakitError, match="target_parameters"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    _assert_unchanged(model, before)
