"""One table of model x config that feeds the generic checks (parity with PEFT, merge, save/load)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class ConvMLP(nn.Module):
    """Every kind lorakit wraps: Embedding, Conv1d, Conv2d, Linear, plus a head for modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12, padding_idx=0)
        self.conv1 = nn.Conv1d(12, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.lin1 = nn.Linear(12 + 4 * 2 * 3, 16)
        self.lin2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (b, t, 12)
        h = h + self.conv1(h.transpose(1, 2)).transpose(1, 2)
        img = self.conv2(h[:, None, :4, :6])  # (b, 4, 2, 3)
        h = torch.cat([h.mean(1), img.flatten(1)], dim=-1)
        return self.head(torch.relu(self.lin2(torch.relu(self.lin1(h)))))


def conv_mlp() -> nn.Module:
    torch.manual_seed(0)
    return ConvMLP()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def tiny_bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def tiny_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=24,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    return OPTForCausalLM(config)


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    sizes = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 2, "num_heads": 2}
    config = T5Config(**sizes, decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(config)


def mha_block() -> nn.Module:
    torch.manual_seed(0)
    return MHABlock()


class MHABlock(nn.Module):
    """A module whose weight is used in a matmul, not through nn.Linear: target_parameters territory."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


class MLP(nn.Module):
    """PEFT's test MLP shape: two linear layers, the first one a target_parameters target."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def float_input(*shape: int) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        return {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(1))}

    return make


class GroupedConvNet(nn.Module):
    """Grouped and depthwise convolutions (PEFT adapts them; B is a grouped 1x1 conv) next to a plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.depthwise = nn.Conv1d(6, 6, 3, groups=6, padding=1)
        self.plain = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.grouped(x))  # (b, 6, 5, 5)
        h = self.depthwise(h.flatten(2)).reshape(h.shape)
        return self.plain(h)


def grouped_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return GroupedConvNet()


def ids_input(vocab: int) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(1, vocab, (2, 7), generator=gen)}

    return make


def positional(make: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"ids": make()["input_ids"]}


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    config: dict[str, Any] = field(default_factory=dict)
    mergeable: bool = True  # False: PEFT cannot merge it either (grouped convs), so the merge checks skip it
    peft_outputs: bool = True  # False: PEFT 0.21 computes it wrongly (docs/variants.md), so output parity skips it

    def __str__(self) -> str:
        return self.name


def output(result: Any) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result


CASES = [
    Case(
        "convmlp",
        conv_mlp,
        positional(ids_input(20)),
        {"target_modules": ["emb", "conv1", "conv2", "lin1", "lin2"], "modules_to_save": ["head"]},
    ),
    Case(
        "convmlp-regex-rslora",
        conv_mlp,
        positional(ids_input(20)),
        {"target_modules": r"lin\d|conv\d", "use_rslora": True, "lora_alpha": 5, "rank_pattern": {"lin2": 3}},
    ),
    Case("gpt2", tiny_gpt2, ids_input(64), {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    Case("gpt2-default-embed", tiny_gpt2, ids_input(64), {"target_modules": ["c_attn", "wte"]}),
    Case(
        "bert-cls",
        tiny_bert_cls,
        ids_input(64),
        {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
    ),
    Case(
        "bert-bias-all",
        tiny_bert_cls,
        ids_input(64),
        {"target_modules": ["query", "key"], "bias": "all", "task_type": "SEQ_CLS"},
    ),
    Case(
        "llama-all-linear",
        tiny_llama,
        ids_input(64),
        {"target_modules": "all-linear", "alpha_pattern": {"q_proj": 32}, "layers_to_transform": None},
    ),
    Case(
        "llama-layer1",
        tiny_llama,
        ids_input(64),
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1], "r": 4},
    ),
    Case(
        "mha-parameter",
        mha_block,
        positional(ids_input(20)),
        {"target_modules": ["out"], "target_parameters": ["attn.in_proj_weight"]},
    ),
    Case(
        "convmlp-lora-bias",
        conv_mlp,
        positional(ids_input(20)),
        {"target_modules": ["conv1", "conv2", "lin1", "lin2"], "lora_bias": True, "lora_alpha": 4},
    ),
    Case("gpt2-lora-bias", tiny_gpt2, ids_input(64), {"target_modules": ["c_attn", "c_fc"], "lora_bias": True}),
    Case(
        "convmlp-tokens",
        conv_mlp,
        positional(ids_input(20)),
        {"target_modules": ["conv1", "lin1"], "trainable_token_indices": {"emb": [1, 3, 5]}},
    ),
    Case("llama-tokens", tiny_llama, ids_input(64), {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]}),
    Case(
        "mha-module",  # PEFT 0.21 adds out_proj's delta twice (huggingface/peft#3774): tests/test_peft_surface.py
        mha_block,
        positional(ids_input(20)),
        {"target_modules": ["attn", "out"], "r": 4},
        peft_outputs=False,
    ),
    Case(
        "grouped-conv",
        grouped_conv_net,
        float_input(2, 4, 5, 5),
        {"target_modules": ["grouped", "depthwise", "plain"], "r": 6},
        mergeable=False,
    ),
]

PEFT_OUTPUTS = [case for case in CASES if case.peft_outputs]  # the cases compared with PEFT's outputs


def trained_files_load_both_ways(ours, theirs, build, run, tmp_path) -> None:
    """Every trainable tensor of both models set at random (as if trained), then each side's saved folder loaded by
    the other library on a fresh base: `run` gives the same outputs."""
    import peft

    from lorakit import LoraModel

    torch.manual_seed(3)
    with torch.no_grad():
        for model in (ours, theirs):
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs.eval().save_pretrained(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back), run(ours), atol=1e-5, rtol=0)
    loaded = LoraModel.from_pretrained(build(), tmp_path / "theirs").eval()
    torch.testing.assert_close(run(loaded), run(theirs), atol=1e-5, rtol=0)


def same_adapter_weights(build: Callable[[], nn.Module], config: dict[str, Any]):
    """(lorakit model, PEFT model) on `build()`'s base with the same random adapter, both in train mode."""
    import peft

    from lorakit import LoraConfig, get_lora_model
    from lorakit.io import adapter_tensors

    torch.manual_seed(2)
    ours = get_lora_model(build(), LoraConfig(init_lora_weights=False, **config))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    tensors = adapter_tensors(ours.model, "default", ours.peft_config["default"])
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in tensors.items()})
    return ours.train(), theirs.train()


def step_side_by_side(models, optimizers, inputs: Callable[[], dict[str, torch.Tensor]], steps: int) -> None:
    """`steps` optimizer steps of each model on the mean square of its outputs for the same inputs."""
    for _ in range(steps):
        for model, optimizer in zip(models, optimizers, strict=True):
            output(model(**inputs())).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
