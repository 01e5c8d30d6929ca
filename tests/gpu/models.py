"""A model factory for the GPU tests' `lorakit train` runs (no tokenizer, no download): repeated blocks in a
ModuleList, so FSDP2 shards one block at a time."""

from __future__ import annotations

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
