"""Modules trained in full next to the adapters (modules_to_save), one trainable copy per adapter."""

from __future__ import annotations

import copy

from torch import nn


class SavedModule(nn.Module):
    """Runs the copy of the first active adapter that has one, else the untouched original."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.enabled = True

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        if self.enabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    @property
    def weight(self):
        return self.current().weight
