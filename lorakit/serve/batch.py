"""The rows decoding together: one key/value cache for all of them, left-padded to a common length.

Each request is prefilled alone (batch of one, no padding: the same computation as `generate` for it alone),
then its cache joins the batch. Rows are left-padded so every new token lands in the same column; the attention
mask hides the padding and each row keeps its own positions, so a row's result does not depend on its neighbours.

    keys/values per layer: [rows, kv_heads, length, head_dim]     mask: [rows, length] (1 = real token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache


def cache_tensors(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class DecodeBatch:
    """Rows (one per request) with their shared padded cache; rows join and leave between decode steps."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rows: list = []
        self.groups: list = []  # each row's adapter
        self.cache = DynamicCache()
        self.mask = self._ones(0, 0)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: object, cache: DynamicCache, group: object = None) -> None:
        """Joins a row prefilled alone, right after the last row of the same `group` (its adapter): rows of one
        adapter stay side by side, which the routed layers read without gathering. The shorter side (the batch or
        the newcomer) is padded on the left."""
        new = cache_tensors(cache)
        new_length = new[0][0].shape[2]
        if not self.rows:
            self.rows, self.groups, self.cache, self.mask = [row], [group], cache, self._ones(1, new_length)
            return
        at = max((i + 1 for i, g in enumerate(self.groups) if g == group), default=len(self.rows))
        width = max(self.mask.shape[1], new_length)

        def insert(old: Tensor, added: Tensor, dim: int = 2) -> Tensor:
            old, added = _pad(old, width, dim), _pad(added, width, dim)
            return torch.cat([old[:at], added, old[at:]])

        self.cache = DynamicCache(
            [(insert(k, nk), insert(v, nv)) for (k, v), (nk, nv) in zip(cache_tensors(self.cache), new, strict=True)]
        )
        self.mask = insert(self.mask, self._ones(1, new_length), dim=1)
        self.rows.insert(at, row)
        self.groups.insert(at, group)

    def remove(self, keep: list[int]) -> None:
        """Keeps the rows at indices `keep`; columns that are padding in every remaining row are dropped."""
        self.rows, self.groups = [self.rows[i] for i in keep], [self.groups[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = DynamicCache(), self._ones(0, 0)
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # the first column a remaining row still uses
        self.mask = mask[:, start:]
        self.cache = DynamicCache([(k[index, :, start:], v[index, :, start:]) for k, v in cache_tensors(self.cache)])

    def step_inputs(self, last_tokens: list[int]) -> dict[str, object]:
        """Forward arguments for one decode step: each row's last token at its own next position. The step
        appends one column to `self.cache` in place."""
        self.mask = torch.cat([self.mask, self._ones(len(self.rows), 1)], dim=1)
        return {
            "input_ids": torch.tensor(last_tokens, device=self.device).unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": self.mask.sum(1, keepdim=True) - 1,
            "cache": self.cache,
            "use_cache": True,
        }

    def _ones(self, rows: int, length: int) -> Tensor:
        return torch.ones(rows, length, dtype=torch.long, device=self.device)


def _pad(t: Tensor, width: int, dim: int = 2) -> Tensor:
    """`t` left-padded with zeros to `width` along `dim` (the sequence dimension)."""
    missing = width - t.shape[dim]
    return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (missing, 0)) if missing else t
