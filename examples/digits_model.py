"""The seed's digit network at scikit-learn scale: an MLP 64 -> 256 -> 128 -> 10 on the bundled 8x8 digits.

`pretrained_mlp` is a factory `lorakit train` can name (model.source = "examples.digits_model:pretrained_mlp"):
it pretrains briefly, on purpose, so that some digits stay weak and LoRA has something to fix, as in the seed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


class DigitsMLP(nn.Module):
    def __init__(self, hidden1: int = 256, hidden2: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 10)

    def forward(self, x: Tensor) -> Tensor:  # (batch, 64) pixel intensities 0..16 -> (batch, 10) logits
        x = torch.relu(self.fc1(x / 16.0))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): a seeded 75/25 split of load_digits()."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


@functools.lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, Tensor]:
    """One short pretraining (2 epochs, batch 64, Adam) shared by every call in a process."""
    torch.manual_seed(0)
    model = DigitsMLP()
    x, y, _, _ = digits_split()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_mlp() -> DigitsMLP:
    """A fresh copy of the pretrained network (the same weights every call)."""
    model = DigitsMLP()
    model.load_state_dict(_pretrained_state())
    return model
