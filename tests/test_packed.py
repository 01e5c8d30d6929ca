"""Compiled unrouted inference steps read the live adapter's factors as views of one buffer (lorakit.packed): the
same outputs as the eager model after every kind of change, and one graph input for the model instead of two a
layer. The buffers are made for CUDA; these tests let the CPU have them too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_lora_model, packed
from lorakit.layer import LoraLayer

ATOL = 1e-5
LAYERS = 2


@pytest.fixture(autouse=True)
def _cpu_packs(monkeypatch):
    monkeypatch.setattr(packed, "PACK_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Counting:
    """A backend that runs the traced graph as it is and counts graphs and their inputs."""

    def __init__(self) -> None:
        self.inputs: list[int] = []

    def __call__(self, gm, example_inputs):
        self.inputs.append(len(example_inputs))
        return gm.forward


def _model(alpha: int = 8):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    lora = get_lora_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules="all-linear"),
        "a0",
    )
    lora.add_adapter("a1", LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules="all-linear"))
    return lora.eval()


def _compiled(lora, backend):
    inner = lora.model
    inner.forward = torch.compile(inner.forward, backend=backend, fullgraph=True)
    return lora


IDS = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))


def _step(lora):
    with torch.no_grad():
        return lora(input_ids=IDS, use_cache=False).logits


def _eager(lora):
    with torch.compiler.set_stance("force_eager"):
        return _step(lora)


def _first_layer(lora) -> LoraLayer:
    return next(m for m in lora.modules() if isinstance(m, LoraLayer))


def _warm(lora):
    """The first compiled step asks for the buffer, the second reads it (and is compiled once more)."""
    _step(lora)
    return _step(lora)


def test_a_compiled_step_reads_one_buffer_for_the_model():
    adapted = 7 * LAYERS
    plain = Counting()
    lora = _model()
    expected = _eager(lora)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed, "PACK_DEVICES", ())  # no buffers: the factors themselves
        _compiled(lora, plain)
        torch.testing.assert_close(_warm(lora), expected, atol=ATOL, rtol=0)
    assert len(plain.inputs) == 1
    torch._dynamo.reset()
    counted = Counting()
    lora = _compiled(_model(), counted)
    torch.testing.assert_close(_warm(lora), expected, atol=ATOL, rtol=0)
    assert counted.inputs == [plain.inputs[0], plain.inputs[0] - 2 * adapted + 1]
    assert all(m._fast is not None for m in lora.modules() if isinstance(m, LoraLayer))
    factor = _first_layer(lora).adapters["a0"].lora_A
    assert factor.untyped_storage().nbytes() > factor.numel() * factor.element_size()  # a view of the buffer


def test_in_place_changes_are_read_without_compiling():
    counted = Counting()
    lora = _compiled(_model(), counted)
    _warm(lora)
    with torch.no_grad():
        _first_layer(lora).adapters["a0"].lora_A.add_(0.5)  # as an optimizer step or a hot swap writes
        lora.model.model.layers[1].mlp.down_proj.adapters["a0"].lora_B.mul_(-2.0)
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
    assert len(counted.inputs) == 2


def test_switching_back_to_an_adapter_compiles_nothing():
    counted = Counting()
    lora = _compiled(_model(), counted)
    first = _warm(lora)
    lora.set_adapter("a1")
    second = _step(lora)
    torch.testing.assert_close(second, _eager(lora), atol=ATOL, rtol=0)
    assert (second - first).abs().max() > 1e-3  # the adapters differ
    lora.set_adapter("a0")
    torch.testing.assert_close(_step(lora), first, atol=ATOL, rtol=0)
    lora.set_adapter("a1")
    torch.testing.assert_close(_step(lora), second, atol=ATOL, rtol=0)
    assert len(counted.inputs) == 3  # before the buffer, a0's, a1's


@pytest.mark.parametrize(
    "change",
    ["new_parameter", "scale", "merged", "deleted", "disabled", "switched", "two_active", "moved", "trained", "routed"],
)
def test_every_change_is_seen_by_the_next_compiled_step(change):
    """At once, by the inner model called directly too (no check runs there), and through the LoraModel."""
    lora = _compiled(_model(), Counting())
    _warm(lora)
    layer = _first_layer(lora)
    adapter = layer.adapters["a0"]
    if change == "new_parameter":
        adapter.lora_A = nn.Parameter(torch.randn_like(adapter.lora_A))
    elif change == "scale":
        adapter.scale = 5.0
    elif change == "merged":
        lora.merge_adapter(["a0"])
    elif change == "deleted":
        lora.set_adapter("a1")
        _step(lora)
        lora.delete_adapter("a0")
    elif change == "switched":
        lora.set_adapter("a1")
    elif change == "two_active":
        lora.set_adapter(["a0", "a1"])
    elif change == "moved":
        lora.to(torch.float64)
    elif change == "trained":  # an optimizer step on factors that are views of the buffer
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=0.1)
        lora(input_ids=IDS, use_cache=False).logits.square().mean().backward()
        optimizer.step()
    if change == "routed":  # packed layers read no state: a routed call must take their offsets away first
        names = ["a1", "a0", "a1"]
        with torch.no_grad():
            routed = lora(input_ids=IDS, use_cache=False, adapter_names=names).logits
            with torch.compiler.set_stance("force_eager"):
                torch.testing.assert_close(routed, lora(input_ids=IDS, use_cache=False, adapter_names=names).logits)
        assert (routed - _eager(lora)).abs().max() > 1e-3  # rows on a1 differ from the unrouted a0 step
    if change == "disabled":
        with lora.disable_adapter():
            torch.testing.assert_close(_direct(lora), _eager(lora), atol=ATOL, rtol=0)
            torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
        return
    torch.testing.assert_close(_direct(lora), _eager(lora), atol=ATOL, rtol=0)
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)


def test_the_enabled_flag_itself_takes_the_offsets_away():
    # disable_adapter() also unmerges, which marks the pack stale; the flag alone must do it too, since packed
    # layers never read it
    lora = _compiled(_model(), Counting())
    _warm(lora)
    lora.state.enabled = False
    assert _first_layer(lora)._fast is None
    torch.testing.assert_close(_direct(lora), _eager(lora), atol=ATOL, rtol=0)
    lora.state.enabled = True
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
    assert _first_layer(lora)._fast is not None  # the next unrouted call packs again


def _direct(lora):
    with torch.no_grad():
        return lora.model(input_ids=IDS, use_cache=False).logits


def test_the_inner_model_called_directly_reads_the_factors_of_the_moment():
    lora = _compiled(_model(), Counting())
    _warm(lora)
    with torch.no_grad():
        _first_layer(lora).adapters["a0"].lora_A.add_(1.0)
        direct = lora.model(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(direct, _eager(lora), atol=ATOL, rtol=0)


def test_nothing_is_packed_where_no_compiled_inference_step_ran():
    lora = _model()
    _step(lora)
    _step(lora)
    lora = _compiled(lora, Counting())
    lora(input_ids=IDS, use_cache=False).logits.sum().backward()
    lora(input_ids=IDS, use_cache=False)
    assert not lora.state.pack_wanted
    assert all(m._fast is None for m in lora.modules() if isinstance(m, LoraLayer))


def test_saved_adapters_after_packing_load_back_the_same(tmp_path):
    lora = _compiled(_model(), Counting())
    expected = _warm(lora)
    lora.save_pretrained(tmp_path)
    torch._dynamo.reset()
    fresh = _model()
    fresh.load_adapter(tmp_path / "a0" if (tmp_path / "a0").exists() else tmp_path, "loaded")
    fresh.set_adapter("loaded")
    torch.testing.assert_close(_step(fresh), expected, atol=ATOL, rtol=0)


def test_a_deep_copy_packs_its_own_factors():
    lora = _compiled(_model(), Counting())
    _warm(lora)
    twin = copy.deepcopy(lora)
    with torch.no_grad():
        _first_layer(twin).adapters["a0"].lora_B.add_(1.0)
    torch.testing.assert_close(_warm(twin), _eager(twin), atol=ATOL, rtol=0)
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
    assert all(m._fast is not None for m in twin.modules() if isinstance(m, LoraLayer))


def test_a_factor_shared_by_two_layers_is_read_where_it_is():
    lora = _model()
    attention = lora.model.model.layers[0].self_attn
    attention.o_proj.adapters["a0"].lora_A = attention.q_proj.adapters["a0"].lora_A  # both 4 x 32
    _compiled(lora, Counting())
    _warm(lora)
    with torch.no_grad():
        attention.q_proj.adapters["a0"].lora_A.mul_(-3.0)  # one write, read by both layers
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)


def test_generate_reads_the_buffer_from_its_second_call():
    """transformers' generate compiles the model inside for a static cache; its first call asks for the buffer, the
    next one reads it, with the eager model's tokens both times."""
    lora = _model()
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.compiler.set_stance("force_eager"):
        want = lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    _compiled(lora, "eager")
    torch.testing.assert_close(lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5), want)
    assert all(m._fast is None for m in lora.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5), want)
    assert all(m._fast is not None for m in lora.modules() if isinstance(m, LoraLayer))


def test_where_nothing_is_packed_a_compiled_step_compiles_once(monkeypatch):
    # the first compiled step asked for a pack even on devices that never get one, and the flag it set failed the
    # graph's guards: every compiled inference model recompiled on its second call
    monkeypatch.setattr(packed, "PACK_DEVICES", ("cuda",))
    model = _model().eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # the LoraModel's own call traced too
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        for _ in range(3):
            compiled(input_ids=ids, use_cache=False)
    assert len(backend.inputs) == 1


# -- siblings (q, k, v; gate, up) computed by one op -----------------------------------------------------------
@torch.library.custom_op("lorakit_test::group", mutates_args=())
def _group_op(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor], scales: list[float],
) -> list[torch.Tensor]:  # fmt: skip
    from lorakit.ops.reference import LoraFactors, lora_linear

    return [
        lora_linear(x, w, b, [LoraFactors(a, b_, s, 0.0)], False)
        for w, b, a, b_, s in zip(weights, biases, lora_as, lora_bs, scales, strict=True)
    ]


@_group_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


class GroupCounting(Counting):
    """Counting, and the group ops each graph calls, by their number of parts."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[int]] = []

    def __call__(self, gm, example_inputs):
        ops = [n for n in gm.graph.nodes if n.target is torch.ops.lorakit_test.group.default]
        self.groups.append([len(n.args[1]) for n in ops])
        return super().__call__(gm, example_inputs)


@pytest.fixture
def group_op(monkeypatch):
    """lorakit's group op as one node of the graph (on CUDA, one kernel), the reference's math inside."""

    def as_one_node(x, parts, training, stacked_a=None):
        weights, biases, factors = zip(*parts, strict=True)
        return _group_op(
            x, list(weights), list(biases), [f.lora_A for f in factors], [f.lora_B for f in factors],
            [f.scale for f in factors],
        )  # fmt: skip

    monkeypatch.setattr("lorakit.layer.ops.lora_linear_group", as_one_node)


def test_a_group_s_factors_of_a_shrink_lie_side_by_side(group_op):
    """The buffer holds every A before every B, so q's, k's and v's A (gate's and up's) are one view of it: the
    tensor a kernel reads for one x A^T of the whole group, equal to their concatenation."""
    from lorakit.layer import _stacked_a

    lora = _model()
    _compiled(lora, "eager")
    _warm(lora)
    for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        members = [_members(lora, name)[0] for name in names]
        spans = members[0]._fast[5][2]
        stacked = _stacked_a(spans)
        factors = [m.adapters["a0"].lora_A for m in members]
        assert torch.equal(stacked, torch.cat(factors)) and stacked.data_ptr() == factors[0].data_ptr()
    assert _stacked_a((spans[1], spans[0])) is None  # not back to back in that order


def _members(lora, suffix: str) -> list[LoraLayer]:
    return [m for n, m in lora.named_modules() if n.endswith(suffix) and isinstance(m, LoraLayer)]


def test_siblings_are_computed_by_one_op_with_the_eager_model_s_outputs(group_op):
    counted = GroupCounting()
    lora = _model()
    expected = _eager(lora)
    _compiled(lora, counted)
    torch.testing.assert_close(_warm(lora), expected, atol=ATOL, rtol=0)
    assert counted.groups == [[], [3, 2] * LAYERS]  # q, k, v and gate, up of every layer; o and down alone
    assert all(m._fast[5] is not None for s in ("q_proj", "k_proj", "v_proj", "up_proj") for m in _members(lora, s))
    assert all(m._fast[5] is None for s in ("o_proj", "down_proj") for m in _members(lora, s))
    assert packed.STASH.pending is None and not packed.BROKEN
    with torch.no_grad():  # in place, then another adapter: both read by the next step
        _members(lora, "k_proj")[0].adapters["a0"].lora_B.mul_(-2.0)
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
    lora.set_adapter("a1")
    torch.testing.assert_close(_step(lora), _eager(lora), atol=ATOL, rtol=0)
    assert counted.groups[2:] == [[3, 2] * LAYERS]


def _compiled_steps_match_eager(lora, step, steps: int) -> GroupCounting:
    """`steps` calls of `step` with the inner model compiled, each with the eager model's outputs; the graphs."""
    with torch.compiler.set_stance("force_eager"):
        expected = step()
    counted = GroupCounting()
    lora.model.forward = torch.compile(lora.model.forward, backend=counted, fullgraph=True)
    for _ in range(steps):
        torch.testing.assert_close(step(), expected, atol=ATOL, rtol=0)
    return counted


class CrossAttention(nn.Module):
    """q from the input, k and v from another tensor (a cross-attention's memory): siblings by name only."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
        self.o_proj = nn.Linear(8, 8)

    def forward(self, x):
        memory = torch.tanh(x)
        return self.o_proj(self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory))


def test_siblings_called_with_other_inputs_are_packed_apart(group_op):
    torch.manual_seed(0)
    config = LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lora = get_lora_model(CrossAttention(), config, "a0").eval()
    x = torch.randn(3, 8)

    def step():
        with torch.no_grad():
            return lora(x)

    counted = _compiled_steps_match_eager(lora, step, 5)
    assert counted.groups == [[], [3, 3], []]  # unpacked; the group, found broken; apart
    assert lora.model.q_proj._fast is not None and lora.model.q_proj._fast[5] is None
    assert packed.STASH.pending is None and not packed.BROKEN


def test_a_hook_on_a_sibling_s_base_keeps_its_group_off(group_op):
    lora = _model()
    _members(lora, "k_proj")[0].base_layer.register_forward_hook(lambda module, args, out: out + 1.0)
    expected = _eager(lora)
    counted = GroupCounting()
    _compiled(lora, counted)
    torch.testing.assert_close(_warm(lora), expected, atol=ATOL, rtol=0)
    assert counted.groups[-1] == [2] + [3, 2] * (LAYERS - 1)  # the first layer's q, k, v each on its own


def test_groups_go_with_their_model_and_with_their_pack(group_op):
    import gc

    lora = _compiled(_model(), GroupCounting())
    _warm(lora)
    numbers = {m._fast[5][0] for s in ("q_proj", "up_proj") for m in _members(lora, s)}
    assert len(numbers) == 2 * LAYERS and numbers <= packed.GROUPS.keys()
    lora.set_adapter("a1")  # the pack goes stale: the groups hold the base layers no longer
    assert not numbers & packed.GROUPS.keys()
    _step(lora)
    del lora
    gc.collect()
    assert not packed.GROUPS


def test_t5_s_self_attentions_group_and_its_cross_attentions_are_packed_apart(group_op):
    """In a real encoder-decoder: q, k, v of every self-attention read one input and stay a group; a cross-
    attention's q reads the decoder's states and its k and v the encoder's, so its groups are found broken and
    packed apart after one step. Every step's outputs are the eager model's."""
    from tests.cases import tiny_t5

    lora = get_lora_model(tiny_t5(), LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"), "a0")
    lora = lora.eval()
    gen = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, 64, (3, 5), generator=gen), "use_cache": False}
    batch["decoder_input_ids"] = torch.randint(0, 64, (3, 2), generator=gen)

    def step():
        with torch.no_grad():
            return lora(**batch).logits

    counted = _compiled_steps_match_eager(lora, step, 4)
    grouped = {n for n, m in lora.named_modules() if isinstance(m, LoraLayer) and m._fast[5] is not None}
    cross = {n for n, m in lora.named_modules() if isinstance(m, LoraLayer) and "EncDecAttention" in n}
    assert len(counted.groups) == 3  # unpacked; every group; the cross-attentions' apart
    assert not grouped & cross and {n.rsplit(".", 1)[1] for n in grouped} == {"q", "k", "v"}
    assert counted.groups[-1].count(3) == 4  # the encoder's two self-attentions and the decoder's two
