"""Per-layer key/value memory with absolute positions, and a transient view for forwards.

Keys are stored after RoPE, so a kept token needs no re-rotation and its position never
changes; `positions` records the (t, h, w) position each kept token was given, per KV head,
because a policy may keep different tokens in different heads. Every head of a layer keeps
the same number of tokens, so a layer's cache is one dense tensor, but layers may differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerMemory:
    keys: torch.Tensor  # [1, kv_heads, M, head_dim], after RoPE
    values: torch.Tensor  # [1, kv_heads, M, head_dim]
    positions: torch.Tensor  # [kv_heads, M, 3] int64 absolute (t, h, w) positions

    def __len__(self) -> int:
        return self.keys.shape[2]


@dataclass
class KVMemory:
    """The compact context of one stream: per-layer caches plus where the stream stands."""

    layers: list[LayerMemory]
    next_position: int = 0  # first position of the next text token: 1 + the largest position used
    video_start: int | None = None  # position s of the open vision block, once the prefix is in
    temporal_groups: int = 0  # frame pairs ingested so far: the next pair's temporal index
    grid_hw: tuple[int, int] | None = None  # patch grid of every frame in this stream
    frames: int = 0  # frames ingested (before padding to pairs)
    full_tokens: int = 0  # tokens an unpruned memory would hold: prefix text + video
    chunks: list[dict] = field(default_factory=list)  # one report per ingested chunk

    @classmethod
    def empty(cls, num_layers: int, kv_heads: int, head_dim: int, device, dtype) -> "KVMemory":
        def layer():
            kv = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
            return LayerMemory(kv, kv.clone(), torch.empty(kv_heads, 0, 3, dtype=torch.long, device=device))

        return cls(layers=[layer() for _ in range(num_layers)])

    def tokens_per_layer(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    def mean_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)


class MemoryView:
    """The memory plus room for `extra` new tokens per layer, for one forward or one answer.

    Attention modules call `update(keys, values, layer)` as on a transformers Cache; the new
    keys are written after the memory in a buffer allocated once, so decoding appends in place
    and the memory itself is never modified.
    """

    def __init__(self, memory: KVMemory, extra: int):
        self.memory_lengths = memory.tokens_per_layer()
        self.lengths = list(self.memory_lengths)
        self.keys, self.values = [], []
        for layer in memory.layers:
            b, h, m, d = layer.keys.shape
            keys = layer.keys.new_empty(b, h, m + extra, d)
            values = layer.values.new_empty(b, h, m + extra, d)
            keys[:, :, :m] = layer.keys
            values[:, :, :m] = layer.values
            self.keys.append(keys)
            self.values.append(values)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, n = self.lengths[layer_idx], keys.shape[2]
        if start + n > self.keys[layer_idx].shape[2]:
            raise RuntimeError(f"memory view of layer {layer_idx} is full: {start} + {n} tokens")
        self.keys[layer_idx][:, :, start:start + n] = keys
        self.values[layer_idx][:, :, start:start + n] = values
        self.lengths[layer_idx] = start + n
        end = start + n
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def new_tokens(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values written into this view (after the memory) for one layer."""
        start, end = self.memory_lengths[layer_idx], self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, start:end], self.values[layer_idx][:, :, start:end]


def commit_chunk(memory: KVMemory, view: MemoryView, positions: torch.Tensor,
                 kept: list[torch.Tensor] | None) -> None:
    """Append the chunk's kept tokens (all if `kept` is None) to every layer, in position order.

    positions: [chunk_len, 3]; kept[l]: [kv_heads, k] sorted indices into the chunk.
    """
    for idx, layer in enumerate(memory.layers):
        keys, values = view.new_tokens(idx)
        heads, dim = keys.shape[1], keys.shape[3]
        chunk_positions = positions.to(layer.positions.device).unsqueeze(0).expand(heads, -1, -1)
        if kept is not None:
            index = kept[idx].to(keys.device)
            gather = index[None, :, :, None].expand(1, heads, index.shape[1], dim)
            keys, values = keys.gather(2, gather), values.gather(2, gather)
            chunk_positions = chunk_positions.gather(1, index[:, :, None].expand(-1, -1, 3))
        layer.keys = torch.cat([layer.keys, keys], dim=2)
        layer.values = torch.cat([layer.values, values], dim=2)
        layer.positions = torch.cat([layer.positions, chunk_positions], dim=1)
