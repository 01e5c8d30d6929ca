"""Adapter trees: the model at a node is the base plus every delta on its path; PEFT agrees, file for file."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, LorakitError, LoraModel, get_lora_model
from lorakit.multi.tree import MANIFEST, load_tree
from tests.cases import mlp, tiny_llama

# legal -> contracts -> leases, and a second root
TREE = {"legal": None, "contracts": "legal", "leases": "contracts", "medical": None}
TARGETS = {
    "legal": ["q_proj", "v_proj"],
    "contracts": ["v_proj", "o_proj"],
    "leases": ["q_proj", "down_proj"],
    "medical": ["k_proj"],
}


def _tree_model(build=tiny_llama, targets=TARGETS) -> LoraModel:
    torch.manual_seed(0)
    model = None
    for i, (name, parent) in enumerate(TREE.items()):
        config = LoraConfig(r=2 + i, init_lora_weights=False, target_modules=targets[name])
        if model is None:
            model = get_lora_model(build(), config, adapter_name=name)
        else:
            model.add_adapter(name, config, parent=parent)
    return model.eval()


def _ids(rows: int = 4) -> torch.Tensor:
    return torch.randint(1, 64, (rows, 6), generator=torch.Generator().manual_seed(2))


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), **kwargs).logits


def test_a_node_is_its_whole_path_and_its_weight_is_the_sum_of_the_path_deltas():
    model = _tree_model(
        mlp, {"legal": ["lin0", "lin1"], "contracts": ["lin1"], "leases": ["lin0"], "medical": ["lin0"]}
    )
    model.set_adapter("leases")
    assert model.active_adapters == ["legal", "contracts", "leases"]
    x = torch.randn(5, 6, dtype=torch.float64)
    model.double()
    lin0, lin1 = model.model.lin0, model.model.lin1
    w0 = lin0.weight + lin0.adapters["legal"].delta_weight() + lin0.adapters["leases"].delta_weight()
    w1 = lin1.weight + lin1.adapters["legal"].delta_weight() + lin1.adapters["contracts"].delta_weight()
    expected = torch.relu(x @ w0.T + lin0.bias) @ w1.T + lin1.bias
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)


def test_training_a_child_leaves_its_ancestors_bit_identical():
    model = _tree_model().train()
    model.set_adapter("leases")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".leases." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (".leases." not in name), name


def test_mixed_batch_rows_serve_whole_paths():
    model = _tree_model()
    names = ["leases", "__base__", "medical", "contracts"]
    mixed = _logits(model, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = _logits(model)[i]
        else:
            model.set_adapter(name)
            expected = _logits(model)[i]
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5)


def test_merging_a_path_into_the_base_gives_the_nodes_model():
    model = _tree_model()
    model.set_adapter("leases")
    expected = _logits(model)
    model.set_adapter("medical")
    merged = model.merge_and_unload(adapter_names=["leases"])  # the node's path: legal, contracts, leases
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_a_saved_tree_reloads_and_peft_gives_the_same_outputs_per_path(tmp_path):
    model = _tree_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["parents"] == TREE
    leases_keys = load_file(tmp_path / "leases" / "adapter_model.safetensors").keys()
    assert {k.split(".")[-3] for k in leases_keys} == {"q_proj", "down_proj"}  # a node's folder: its own delta
    reloaded = load_tree(tiny_llama(), tmp_path)
    assert reloaded.state.parents == TREE
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "legal", adapter_name="legal").eval()
    for name in ("contracts", "leases", "medical"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    for node in ("leases", "contracts", "medical"):
        model.set_adapter(node)
        reloaded.set_adapter(node)
        theirs.base_model.set_adapter(model.active_adapters)
        expected = _logits(model)
        torch.testing.assert_close(_logits(reloaded.eval()), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=1e-5)


def test_dora_nodes_are_refused_below_a_parent_and_as_a_parent():
    model = _tree_model()
    with pytest.raises(LorakitError, match="DoRA rescales the whole weight"):
        model.add_adapter("x", LoraConfig(use_dora=True, target_modules=["q_proj"]), parent="legal")
    model.add_adapter("d", LoraConfig(use_dora=True, target_modules=["q_proj"]))  # a DoRA root alone is fine
    with pytest.raises(LorakitError, match="DoRA rescales the whole weight"):
        model.add_adapter("y", LoraConfig(target_modules=["q_proj"]), parent="d")
    assert "x" not in model.peft_config and "y" not in model.peft_config


def test_bad_tree_input_is_refused_and_leaves_the_model_unchanged():
    model = _tree_model()
    expected = _logits(model)
    with pytest.raises(LorakitError, match=r"parent 'nope' is not a loaded adapter; loaded: \['contracts'"):
        model.add_adapter("x", LoraConfig(target_modules=["q_proj"]), parent="nope")
    with pytest.raises(LorakitError, match="own parent"):
        model.add_adapter("x", LoraConfig(target_modules=["q_proj"]), parent="x")
    with pytest.raises(LorakitError, match=r"'legal' is the parent of \['contracts'\]; delete those children first"):
        model.delete_adapter("legal")
    assert "x" not in model.peft_config and model.state.parents == TREE
    assert not any("x" in layer.adapters for layer in model.modules() if hasattr(layer, "adapters"))
    torch.testing.assert_close(_logits(model), expected)


def test_a_manifest_with_a_cycle_or_a_missing_parent_is_refused_before_loading(tmp_path):
    model = _tree_model()
    model.save_pretrained(tmp_path)
    for parents, message in (
        ({"legal": "leases", "contracts": "legal", "leases": "contracts", "medical": None}, "form a cycle"),
        ({"legal": None, "contracts": "gone", "leases": "contracts", "medical": None}, r"parents \['gone'\]"),
    ):
        (tmp_path / MANIFEST).write_text(json.dumps({"format": "lorakit-tree/1", "parents": parents}))
        base = LoraModel(tiny_llama())
        with pytest.raises(LorakitError, match=message):
            load_tree(base, tmp_path)
        assert not base.peft_config


@pytest.mark.parametrize(
    "manifest, message",
    [
        ([["legal", None]], "is not a lorakit-tree/1 manifest"),
        ({"format": "lorakit-tree/1", "parents": {"legal": None, "contracts": ["legal"]}}, "names or null, found"),
        ({"format": "lorakit-tree/1", "parents": {"legal": None, "../legal": "legal"}}, "path separator"),
    ],
    ids=["a-list", "a-list-as-parent", "a-path-as-name"],
)
def test_a_malformed_manifest_is_refused_with_one_error_before_loading(tmp_path, manifest, message, monkeypatch):
    from lorakit import io

    _tree_model().save_pretrained(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    base = LoraModel(tiny_llama())
    monkeypatch.setattr(io, "read_weights", lambda *a, **k: pytest.fail("a node was read before the check"))
    with pytest.raises(LorakitError, match=message):
        load_tree(base, tmp_path)
    assert not base.peft_config
