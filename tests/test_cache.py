"""AdapterCache: folders read once, LRU by bytes / count, no file I/O on a hit; hotswap into fixed-shape slots gives
the outputs of a normal load and, under torch.compile, never recompiles; bad input changes nothing."""

from __future__ import annotations

import os
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, LorakitError, LoraModel, get_lora_model
from lorakit import io as lorakit_io
from lorakit.multi.cache import AdapterCache, prepare_slot
from tests.cases import conv_mlp, ids_input, mlp, positional

ATOL = 1e-5
TARGETS = ["emb", "conv1", "conv2", "lin1", "lin2"]
ADAPTERS = {  # different ranks, scales and target subsets, all fitting a slot of rank 8 on TARGETS
    "r4": dict(target_modules=TARGETS, r=4, lora_alpha=8),
    "r8": dict(target_modules=TARGETS, r=8, lora_alpha=3, use_rslora=True),
    "pattern": dict(target_modules=["conv2", "lin1", "lin2"], r=6, lora_alpha=4, rank_pattern={"lin2": 2}),
    "r2": dict(target_modules=["lin1"], r=2, lora_alpha=16),
}
INPUTS = positional(ids_input(20))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        get_lora_model(conv_mlp(), LoraConfig(init_lora_weights=False, **config)).save_pretrained(root / name)
    return root


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS())


def _loaded(path) -> torch.Tensor:
    """The reference: the adapter loaded the ordinary way, no cache, no slot."""
    return _run(LoraModel.from_pretrained(conv_mlp(), path).eval())


def _slot_model(folders, cache: AdapterCache | None = None, rank: int = 8) -> LoraModel:
    model = LoraModel(conv_mlp()).eval()
    model.adapter_cache = cache
    model.load_adapter(folders / "r4", "live")
    prepare_slot(model, "live", rank)
    return model


def _no_file_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("read from disk")

    monkeypatch.setattr(lorakit_io, "read_weights", refuse)
    monkeypatch.setattr(lorakit_io, "read_config", refuse)


# -- RAM tier ---------------------------------------------------------------------------------------------


def test_load_adapter_reads_each_folder_once(folders, monkeypatch):
    cache = AdapterCache()
    first = LoraModel(conv_mlp()).eval()
    first.adapter_cache = cache
    first.load_adapter(folders / "r8", "a")
    assert cache.misses == 1 and folders / "r8" in cache
    _no_file_reads(monkeypatch)
    second = LoraModel(conv_mlp()).eval()
    second.adapter_cache = cache
    second.load_adapter(folders / "r8", "a")  # from RAM: reading would raise
    torch.testing.assert_close(_run(second), _run(first), atol=0, rtol=0)
    assert cache.hits == 1


def test_a_removed_folder_is_still_served_from_ram(folders, tmp_path):
    shutil.copytree(folders / "pattern", tmp_path / "pattern")
    cache = AdapterCache()
    cache.get(tmp_path / "pattern")
    shutil.rmtree(tmp_path / "pattern")
    model = LoraModel(conv_mlp()).eval()
    model.adapter_cache = cache
    model.load_adapter(tmp_path / "pattern", "p")
    torch.testing.assert_close(_run(model), _loaded(folders / "pattern"), atol=ATOL, rtol=0)


def test_a_changed_folder_is_read_again(folders, tmp_path):
    shutil.copytree(folders / "r4", tmp_path / "a")
    cache = AdapterCache()
    before = cache.get(tmp_path / "a")
    shutil.copy(folders / "r8" / lorakit_io.WEIGHTS_NAME, tmp_path / "a" / lorakit_io.WEIGHTS_NAME)
    shutil.copy(folders / "r8" / lorakit_io.CONFIG_NAME, tmp_path / "a" / lorakit_io.CONFIG_NAME)
    after = cache.get(tmp_path / "a")
    assert cache.misses == 2 and after is not before and after.config.r == 8 and len(cache) == 1


def test_lru_by_count_and_by_bytes(folders):
    by_count = AdapterCache(max_adapters=2)
    for name in ("r4", "r8", "r4", "pattern"):  # r8 is the least recently used when pattern comes
        by_count.get(folders / name)
    assert folders / "r4" in by_count and folders / "pattern" in by_count and folders / "r8" not in by_count
    sizes = {name: AdapterCache().get(folders / name).nbytes for name in ("r4", "r8", "r2")}
    by_bytes = AdapterCache(max_bytes=sizes["r4"] + sizes["r8"])
    for name in ("r4", "r8", "r2"):
        by_bytes.get(folders / name)
    assert folders / "r4" not in by_bytes and len(by_bytes) == 2 and by_bytes.nbytes <= by_bytes.max_bytes


def test_a_cache_too_small_for_one_adapter_is_refused(folders):
    cache = AdapterCache(max_bytes=100)
    model = LoraModel(conv_mlp())
    model.adapter_cache = cache
    with pytest.raises(LorakitError, match="more than the cache's max_bytes=100"):
        model.load_adapter(folders / "r4", "a")
    assert model.peft_config == {} and len(cache) == 0
    with pytest.raises(LorakitError, match="max_adapters"):
        AdapterCache(max_adapters=0)


# -- device slots -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_swapped_adapter_gives_the_outputs_of_a_normal_load(folders, name):
    model = _slot_model(folders, AdapterCache())
    model.hotswap_adapter(folders / name, "live")
    torch.testing.assert_close(_run(model), _loaded(folders / name), atol=ATOL, rtol=0)


def test_slot_form_keeps_the_outputs_and_saves_an_equivalent_adapter(folders, tmp_path):
    model = _slot_model(folders)
    assert {m.r for m in _slot_adapters(model)} == {8} and {m.scale for m in _slot_adapters(model)} == {1.0}
    torch.testing.assert_close(_run(model), _loaded(folders / "r4"), atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "saved", selected_adapters=["live"])
    torch.testing.assert_close(_loaded(tmp_path / "saved" / "live"), _loaded(folders / "r4"), atol=ATOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(conv_mlp(), tmp_path / "saved" / "live").eval()
    torch.testing.assert_close(_run(theirs), _loaded(folders / "r4"), atol=ATOL, rtol=0)


def _slot_adapters(model: LoraModel):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scale")]


def test_a_slot_follows_the_model_to_another_dtype(folders):
    cache = AdapterCache()
    model = _slot_model(folders, cache)
    model.hotswap_adapter(folders / "r8", "live")
    model.double()
    model.hotswap_adapter(folders / "r2", "live")
    model.hotswap_adapter(folders / "r8", "live")
    assert cache.resident == 3  # r8 staged again in float64: what is staged matches the slot's dtype
    torch.testing.assert_close(_run(model).float(), _loaded(folders / "r8"), atol=ATOL, rtol=0)


def test_swapping_from_a_loaded_adapter(folders):
    model = _slot_model(folders)
    model.load_adapter(folders / "pattern", "pattern")
    model.hotswap_adapter("pattern", "live")
    torch.testing.assert_close(_run(model), _loaded(folders / "pattern"), atol=ATOL, rtol=0)


def test_eviction_and_reload_give_identical_outputs(folders):
    cache = AdapterCache(max_adapters=1, device_slots=1)
    model = _slot_model(folders, cache)
    model.hotswap_adapter(folders / "r8", "live")
    first = _run(model)
    model.hotswap_adapter(folders / "pattern", "live")  # evicts r8 from RAM and from the device
    assert folders / "r8" not in cache and cache.resident == 1
    model.hotswap_adapter(folders / "r8", "live")  # read again
    assert cache.misses == 4  # r4 (the first load), r8, pattern, r8 again
    torch.testing.assert_close(_run(model), first, atol=0, rtol=0)


def test_resident_adapters_switch_without_file_io(folders, monkeypatch):
    cache = AdapterCache(device_slots=2)
    model = _slot_model(folders, cache)
    expected = {}
    for name in ("r8", "r2"):
        model.hotswap_adapter(folders / name, "live")
        expected[name] = _run(model)
    _no_file_reads(monkeypatch)
    for name in ("r8", "r2", "r8"):
        model.hotswap_adapter(folders / name, "live")
        torch.testing.assert_close(_run(model), expected[name], atol=0, rtol=0)
    assert cache.resident == 2


def test_compiled_model_does_not_recompile_on_swap(tmp_path):
    paths = {}
    for seed, (r, alpha, targets) in enumerate([(4, 8, ["lin0", "lin1"]), (2, 5, ["lin1"]), (8, 1, ["lin0", "lin1"])]):
        torch.manual_seed(seed)
        config = LoraConfig(init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=targets)
        get_lora_model(mlp(), config).save_pretrained(paths.setdefault(seed, tmp_path / str(seed)))
    x = torch.randn(3, 6)
    model = LoraModel(mlp()).eval()
    model.load_adapter(paths[0], "live")
    prepare_slot(model, "live", rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (1, 2, 0):
                model.hotswap_adapter(paths[seed], "live")
                expected = LoraModel.from_pretrained(mlp(), paths[seed]).eval()(x)
                torch.testing.assert_close(compiled(x), expected, atol=ATOL, rtol=0)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_ram_is_pinned_and_a_swap_gives_a_normal_load(folders):
    cache = AdapterCache()
    model = LoraModel(conv_mlp().cuda()).eval()
    model.adapter_cache = cache
    model.load_adapter(folders / "r4", "live")
    prepare_slot(model, "live", 8)
    model.hotswap_adapter(folders / "r8", "live")
    assert cache.pin_memory and all(t.is_pinned() for t in cache.get(folders / "r8").weights.values())
    inputs = {k: v.cuda() for k, v in INPUTS().items()}
    expected = LoraModel.from_pretrained(conv_mlp().cuda(), folders / "r8").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), expected(**inputs), atol=ATOL, rtol=0)


# -- bad input ---------------------------------------------------------------------------------------------


def _state(model: LoraModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: LoraModel, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _edited(folders, tmp_path, edit) -> os.PathLike:
    target = tmp_path / "edited"
    shutil.copytree(folders / "r4", target)
    weights = load_file(target / lorakit_io.WEIGHTS_NAME)
    edit(weights)
    save_file(weights, target / lorakit_io.WEIGHTS_NAME, metadata={"format": "pt"})
    return target


def _widen_lin1(weights):
    key = next(k for k in weights if "lin1.lora_A" in k)
    weights[key] = torch.randn(4, 99)


def _grow_rank(weights):
    for key in [k for k in weights if "lin1" in k]:
        weights[key] = torch.randn(12, weights[key].shape[1]) if "lora_A" in key else torch.randn(16, 12)


def _extra_target(weights):
    weights["base_model.model.head.lora_A.weight"] = torch.randn(4, 16)
    weights["base_model.model.head.lora_B.weight"] = torch.randn(3, 4)


BAD_FILES = {
    "shape from another base": (_widen_lin1, r"lin1\.lora_A.*do not fit lin1"),
    "rank above the slot's": (_grow_rank, r"lin1.*rank 12 is larger than slot 'live'.*prepare_slot"),
    "target the slot lacks": (_extra_target, r"does not: \['base_model\.model\.head\.lora_A"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_adapter_that_does_not_fit_the_slot_changes_nothing(folders, tmp_path, case):
    edit, message = BAD_FILES[case]
    model = _slot_model(folders, AdapterCache())
    before = _state(model)
    with pytest.raises(LorakitError, match=message):
        model.hotswap_adapter(_edited(folders, tmp_path, edit), "live")
    _assert_same_state(model, before)


def test_swaps_that_cannot_work_are_refused(folders):
    model = _slot_model(folders)
    model.add_adapter("dora", LoraConfig(target_modules=["lin1"], use_dora=True))
    before = _state(model)
    with pytest.raises(LorakitError, match="'dora' is not plain LoRA"):
        model.hotswap_adapter("dora", "live")
    with pytest.raises(LorakitError, match="no adapter 'nope' to swap into"):
        model.hotswap_adapter(folders / "r8", "nope")
    with pytest.raises(LorakitError, match="does not exist"):
        model.hotswap_adapter(folders / "missing", "live")
    with pytest.raises(LorakitError, match="rank must be an integer >= 8"):
        prepare_slot(model, "live", rank=4)
    _assert_same_state(model, before)


class _DataOps(TorchDispatchMode):
    """Counts the ops that read or write tensor data (each a kernel launch on a GPU); views are free."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _switch_ops(tmp_path, layers: int) -> int:
    """Data ops of one switch from RAM of an adapter at the slot's rank, on `layers` linear layers."""

    def deep() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Linear(6, 6) for _ in range(layers)))

    config = LoraConfig(r=4, lora_alpha=8, target_modules=[str(i) for i in range(layers)], init_lora_weights=False)
    for seed in (0, 1):
        torch.manual_seed(10 + seed)
        get_lora_model(deep(), config).save_pretrained(tmp_path / f"{layers}-{seed}")
    model = LoraModel(deep()).eval()
    model.adapter_cache = AdapterCache(device_slots=0)
    model.load_adapter(tmp_path / f"{layers}-0", "live")
    prepare_slot(model, "live")
    model.adapter_cache.get(tmp_path / f"{layers}-1")
    with _DataOps() as ops:
        model.hotswap_adapter(tmp_path / f"{layers}-1", "live")
    x = torch.randn(3, 6)
    expected = LoraModel.from_pretrained(deep(), tmp_path / f"{layers}-1").eval()
    torch.testing.assert_close(_run_x(model, x), _run_x(expected, x), atol=ATOL, rtol=0)
    return ops.count


def _run_x(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_a_switch_from_ram_costs_a_few_ops_whatever_the_depth(tmp_path):
    """The adapter moves as one buffer per dtype and is scaled and copied by multi-tensor ops: not a few ops per
    layer (on a GPU, hundreds of kernel launches and small host-to-device copies for an all-linear LLM)."""
    shallow, deep = _switch_ops(tmp_path, 2), _switch_ops(tmp_path, 24)
    assert shallow == deep <= 4


def test_a_folder_that_carries_a_base_table_is_refused_with_its_reason(tmp_path):
    """An adapted embed_tokens is saved with its base table (PEFT's save_embedding_layers="auto"); a hot swap changes
    factors only, so the swap names that and the two ways out instead of calling the keys unknown targets. Saved
    without the table, the same adapter swaps in."""
    from tests.cases import tiny_llama

    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    get_lora_model(tiny_llama().eval(), config).save_pretrained(tmp_path / "whole")
    source = get_lora_model(tiny_llama().eval(), config)
    source.save_pretrained(tmp_path / "factors", save_embedding_layers=False)
    model = get_lora_model(tiny_llama().eval(), config, "live")
    with pytest.raises(LorakitError, match="base-layer tensors.*save_embedding_layers=False"):
        model.hotswap_adapter(tmp_path / "whole", "live")
    model.hotswap_adapter(tmp_path / "factors", "live")
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_slots_of_deleted_adapters_neither_keep_them_alive_nor_pile_up():
    """A slot kept for a model must let its adapter go with delete_adapter, and slots prepared under ever-new names
    (one per adapter served, then deleted) stay as many as the model's live slots."""
    import weakref

    from lorakit.multi import cache

    model = get_lora_model(mlp(), LoraConfig(r=2, target_modules=["lin1"]), adapter_name="kept")
    prepare_slot(model, "kept", rank=4)
    factors = []
    for i in range(10):
        model.add_adapter(f"slot{i}", LoraConfig(r=2, target_modules=["lin1"]))
        prepare_slot(model, f"slot{i}", rank=4)
        factors.append(weakref.ref(model.model.lin1.adapters[f"slot{i}"].lora_A))
        model.delete_adapter(f"slot{i}")
        assert factors[-1]() is None
        assert sorted(cache._SLOTS[model]) == ["kept", f"slot{i}"]  # the one deleted last goes at the next prepare
    model.hotswap_adapter("kept", "kept")  # the kept slot is still the model's and still works
