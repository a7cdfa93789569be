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
    importance: torch.Tensor  # [kv_heads, M] float32 score when kept; inf = never evicted (prompt text)

    def __len__(self) -> int:
        return self.keys.shape[2]


@dataclass
class KVMemory:
    """The compact context of one stream: per-layer caches plus where the stream stands."""

    layers: list[LayerMemory]
    budget: int | None = None  # most tokens a layer may hold; None = unbounded
    next_position: int = 0  # first position of the next text token: 1 + the largest position used
    video_start: int | None = None  # position s of the open vision block, once the prefix is in
    temporal_groups: int = 0  # frame pairs ingested so far: the next pair's temporal index
    grid_hw: tuple[int, int] | None = None  # patch grid of every frame in this stream
    frames: int = 0  # frames ingested (before padding to pairs)
    full_tokens: int = 0  # tokens an unpruned memory would hold: prefix text + video
    evicted: int = 0  # tokens (summed over layers) removed to stay within the budget
    chunks: list[dict] = field(default_factory=list)  # one report per ingested chunk

    @classmethod
    def empty(cls, num_layers: int, kv_heads: int, head_dim: int, device, dtype,
              budget: int | None = None) -> "KVMemory":
        def layer():
            kv = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
            return LayerMemory(kv, kv.clone(), torch.empty(kv_heads, 0, 3, dtype=torch.long, device=device),
                               torch.empty(kv_heads, 0, device=device))

        return cls(layers=[layer() for _ in range(num_layers)], budget=budget)

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values): what a forward after this memory attends to."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def tokens_per_layer(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    def mean_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)


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


def _keep_columns(layer: LayerMemory, keep: torch.Tensor) -> None:
    """Keep, per head, the tokens at sorted indices keep [kv_heads, k]."""
    heads, dim = layer.keys.shape[1], layer.keys.shape[3]
    gather = keep[None, :, :, None].expand(1, heads, keep.shape[1], dim)
    layer.keys = layer.keys.gather(2, gather)
    layer.values = layer.values.gather(2, gather)
    layer.positions = layer.positions.gather(1, keep[:, :, None].expand(-1, -1, 3))
    layer.importance = layer.importance.gather(1, keep)


def make_room(memory: KVMemory, incoming: list[int]) -> list[int]:
    """Evict old tokens so that each layer can take `incoming[l]` new ones within the budget.

    Per layer and head, the tokens with the lowest stored importance go first, the oldest first
    among equals (so scoreless policies get a sliding window). Prompt text is never evicted.
    Returns the number of tokens evicted per layer.
    """
    if memory.budget is None:
        return [0] * len(memory.layers)
    excesses = [max(len(layer) + count - memory.budget, 0) for layer, count in zip(memory.layers, incoming)]
    for idx, (layer, count, excess) in enumerate(zip(memory.layers, incoming, excesses)):
        # check every layer before changing any, so a refused chunk leaves the memory as it was
        if count > memory.budget or excess > int(torch.isfinite(layer.importance[0]).sum()):
            raise ValueError(
                f"memory budget {memory.budget} tokens per layer cannot hold layer {idx}'s new chunk "
                f"({count} tokens kept) plus the prompt text; raise the budget or lower chunk_frames"
            )
    for layer, excess in zip(memory.layers, excesses):
        if excess == 0:
            continue
        order = torch.sort(layer.importance, dim=1, stable=True).indices  # stable: oldest first among ties
        keep = order[:, excess:].sort(dim=1).values  # back to position order
        _keep_columns(layer, keep)
    memory.evicted += sum(excesses)
    return excesses


def commit_chunk(memory: KVMemory, view: MemoryView, positions: torch.Tensor, protected: torch.Tensor,
                 kept: list[torch.Tensor] | None, scores: list[torch.Tensor] | None) -> list[int]:
    """Append the chunk's kept tokens (all if `kept` is None) to every layer, in position order.

    positions: [chunk_len, 3]; protected: [chunk_len] bool (stored with infinite importance);
    kept[l]: [kv_heads, k] sorted chunk indices; scores[l]: [kv_heads, chunk_len] importance.
    Evicts old tokens first when a budget is set. Returns the tokens evicted per layer.
    """
    chunk_len = positions.shape[0]
    heads = memory.layers[0].keys.shape[1]
    incoming = [chunk_len] * len(memory.layers) if kept is None else [k.shape[1] for k in kept]
    evicted = make_room(memory, incoming)
    for idx, layer in enumerate(memory.layers):
        keys, values = view.new_tokens(idx, chunk_len)
        device = layer.positions.device
        importance = torch.zeros(heads, chunk_len, device=device) if scores is None else scores[idx].float().to(device)
        importance = importance.masked_fill(protected.to(device), float("inf"))
        new = LayerMemory(keys, values, positions.to(device).unsqueeze(0).expand(heads, -1, -1), importance)
        if kept is not None:
            _keep_columns(new, kept[idx].to(device))
        layer.keys = torch.cat([layer.keys, new.keys], dim=2)
        layer.values = torch.cat([layer.values, new.values], dim=2)
        layer.positions = torch.cat([layer.positions, new.positions], dim=1)
        layer.importance = torch.cat([layer.importance, new.importance], dim=1)
    return evicted
