"""A model factory for the GPU tests' `lorakit train` runs (no tokenizer, no download): repeated blocks in a
ModuleList, so FSDP2 shards one block at a time."""

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


def block_mlp_csv(path: Path, rows: int) -> str:
    """A CSV of `rows` seeded examples for block_mlp (32 features; the label: the first four sum above 0), written to
    `path`; returns data.feature_columns as TOML."""
    features = torch.randn(rows, 32, generator=torch.Generator().manual_seed(0))
    labels = (features[:, :4].sum(1) > 0).long()
    lines = ["label," + ",".join(f"x{i}" for i in range(32))]
    lines += [f"{int(y)}," + ",".join(f"{v:.5f}" for v in x) for x, y in zip(features.tolist(), labels, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return json.dumps([f"x{i}" for i in range(32)])
