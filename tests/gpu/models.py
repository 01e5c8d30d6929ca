"""Model factories for the GPU tests (no tokenizer, no download): repeated blocks in a ModuleList for `lorakit
train` runs, so FSDP2 shards one block at a time; a two-layer Llama for the compiled decode tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.relu(self.up(x)))


class BlockMLP(nn.Module):
    def __init__(self, features: int = 32, width: int = 64, depth: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(features, width), nn.Linear(width, classes)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def block_mlp() -> BlockMLP:
    torch.manual_seed(0)
    return BlockMLP()


def block_mlp_run(folder: Path, rows: int, batch_size: int, max_steps: int, grad_accum: int = 1) -> Path:
    """A `lorakit train` config (returned) for block_mlp in fp32 over a CSV of `rows` seeded examples (32 features;
    the label: the first four sum above 0), both written into `folder`; LoRA r4 on up and down, no plots."""
    features = torch.randn(rows, 32, generator=torch.Generator().manual_seed(0))
    labels = (features[:, :4].sum(1) > 0).long()
    lines = ["label," + ",".join(f"x{i}" for i in range(32))]
    lines += [f"{int(y)}," + ",".join(f"{v:.5f}" for v in x) for x, y in zip(features.tolist(), labels, strict=True)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    columns = json.dumps([f"x{i}" for i in range(32)])
    config = folder / "config.toml"
    config.write_text(f"""
task = "classification"
[model]
source = "tests.gpu.models:block_mlp"
[data]
path = "{folder / "data.csv"}"
feature_columns = {columns}
[lora]
r = 4
lora_alpha = 8
target_modules = ["up", "down"]
[optim]
lr = 0.01
batch_size = {batch_size}
grad_accum = {grad_accum}
max_steps = {max_steps}
precision = "fp32"
[run]
progress = "none"
log_every = 1
tensorboard = false
plots = false
""")
    return config


def tiny_llama(dtype: torch.dtype = torch.float32, device: str = "cuda") -> nn.Module:
    """Two Llama layers (hidden 128, GQA) with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device, dtype)
