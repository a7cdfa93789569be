"""MemoryView: the cache the decoder layers write into during a forward, over a context it never modifies."""

from __future__ import annotations

import torch


class MemoryView:
    """A context (a memory's per-layer keys and values) plus room for `extra` new tokens per
    layer, for one forward or one answer.

    Attention modules call `update(keys, values, layer)` as on a transformers Cache; the new
    keys are written after the memory in a buffer allocated once, so decoding appends in place
    and the memory itself is never modified. `rewind` drops what was written after a point,
    so probe forwards can be re-run over the same chunk without copying anything.
    """

    def __init__(self, context: list[tuple[torch.Tensor, torch.Tensor]], extra: int):
        self.memory_lengths = [keys.shape[2] for keys, _ in context]
        self.lengths = list(self.memory_lengths)
        self.keys, self.values = [], []
        for layer_keys, layer_values in context:
            b, h, m, d = layer_keys.shape
            keys = layer_keys.new_empty(b, h, m + extra, d)
            values = layer_values.new_empty(b, h, m + extra, d)
            keys[:, :, :m] = layer_keys
            values[:, :, :m] = layer_values
            self.keys.append(keys)
            self.values.append(values)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, n = self.lengths[layer_idx], keys.shape[2]
        if start + n > self.keys[layer_idx].shape[2]:
            raise RuntimeError(f"memory view of layer {layer_idx} is full: {start} + {n} tokens")
        end = start + n
        self.keys[layer_idx][:, :, start:end] = keys
        self.values[layer_idx][:, :, start:end] = values
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def rewind(self, new_tokens: int, layers: range | None = None) -> None:
        """Keep only the first `new_tokens` tokens written after the memory (in `layers`, default all)."""
        for idx in layers if layers is not None else range(len(self.lengths)):
            self.lengths[idx] = self.memory_lengths[idx] + new_tokens

    def context(self, new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of the memory and the first `new_tokens` written after it."""
        ends = [start + new_tokens for start in self.memory_lengths]
        return [(k[:, :, :end], v[:, :, :end]) for k, v, end in zip(self.keys, self.values, ends)]

    def new_tokens(self, layer_idx: int, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values written into this view after the memory (the first `count` of them)."""
        start = self.memory_lengths[layer_idx]
        end = self.lengths[layer_idx] if count is None else start + count
        return self.keys[layer_idx][:, :, start:end], self.values[layer_idx][:, :, start:end]
