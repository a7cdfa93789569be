"""Per-layer key/value memory with absolute positions: what a stream keeps, and how it grows.

Keys are stored after RoPE, so a kept token needs no re-rotation and its position never
changes; `positions` records the (t, h, w) position each kept token was given, per KV head,
because a policy may keep different tokens in different heads. Every head of a layer keeps
the same number of tokens, so a layer's cache is one dense tensor, but layers may differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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
    video_start: int | None = None  # where the video starts (the open vision block of Qwen2-VL), once the prefix is in
    temporal_groups: int = 0  # frame pairs ingested so far: the next pair's temporal index
    grid_hw: tuple[int, int] | None = None  # patch grid of every frame in this stream
    fps: float | None = None  # frames per second of video time it is sampled at (Qwen2.5-VL's positions follow it)
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

    def fork(self) -> "KVMemory":
        """A copy to extend without changing this memory. It shares the tensors: commit, forget and
        evictions put new tensors in place of the old ones, never write into them."""
        return replace(self, layers=[replace(layer) for layer in self.layers], chunks=list(self.chunks))

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values): what a forward after this memory attends to."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def tokens_per_layer(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    def mean_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)

    def check_grid(self, grid_hw: tuple[int, int]) -> None:
        """Refuse frames of another size than the stream's (before any work is spent on them)."""
        if self.grid_hw is not None and self.grid_hw != tuple(grid_hw):
            raise ValueError(f"frame size changed mid-stream: patch grid {tuple(grid_hw)} after {self.grid_hw}; "
                             "every frame of a stream must have the same size")

    def check_fps(self, fps: float) -> None:
        """Refuse a rate that is not a number > 0, or another rate than the stream's (its positions would be
        out of time)."""
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be a finite number > 0, got {fps}")
        if self.fps is not None and fps != self.fps:
            raise ValueError(f"frame rate changed mid-stream: {fps} fps after {self.fps}; a stream keeps one rate")

    def position_after(self, positions: torch.Tensor) -> int:
        """Where text after tokens at `positions` [n, 3] starts: 1 + the largest position used."""
        return max(self.next_position, int(positions.max()) + 1)

    def commit(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
               protected: torch.Tensor, kept: list[torch.Tensor] | None, scores: list[torch.Tensor] | None, *,
               frames: int, grid_thw: tuple[int, int, int], fps: float, video_start: int, report: dict,
               forget_before: int | None = None) -> dict:
        """Append a chunk's kept tokens to every layer, in position order, and advance the stream.

        new_kv[l]: the chunk's keys and values in layer l, [1, kv_heads, chunk_len, head_dim];
        positions: [chunk_len, 3]; protected: [chunk_len] bool (stored with infinite importance);
        kept[l]: [kv_heads, k] sorted chunk indices each head keeps (None: all); scores[l]: [kv_heads,
        chunk_len] importance, for evictions (None: zeros); grid_thw: the chunk's patch grid; fps: its frame
        rate; video_start: where the stream's vision block starts; forget_before: drop the stored video tokens whose temporal
        position is below it first. Evicts old tokens first when a budget is set. All or nothing: a chunk
        refused (frame size, budget) leaves the memory as it was. Returns the chunk's record -- `report`
        plus kept, evicted (per layer, forgotten included) and memory_tokens -- which is also kept in `chunks`.
        """
        self.check_grid(grid_thw[1:])
        self.check_fps(fps)
        chunk_len = positions.shape[0]
        heads = self.layers[0].keys.shape[1]
        incoming = [chunk_len] * len(self.layers) if kept is None else [k.shape[1] for k in kept]
        # every layer before any changes, so a refused chunk leaves the memory as it was; forgetting frees only
        # what eviction could, so the same chunks fit either way
        check_room(self, incoming)
        forgotten = self.forget(forget_before) if forget_before is not None else [0] * len(self.layers)
        evicted = [a + b for a, b in zip(forgotten, make_room(self, incoming))]
        for idx, (layer, (keys, values)) in enumerate(zip(self.layers, new_kv)):
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
        self.next_position = self.position_after(positions)
        self.video_start = video_start
        self.grid_hw = tuple(grid_thw[1:])
        self.fps = fps
        self.temporal_groups += grid_thw[0]
        self.frames += frames
        self.full_tokens += chunk_len
        record = dict(report, kept=incoming, evicted=evicted, memory_tokens=self.mean_tokens())
        self.chunks.append(record)
        return record


    def forget(self, before: int) -> list[int]:
        """Drop the stored video tokens whose temporal position is below `before` (prompt text stays);
        returns the number dropped per layer. Every head of a layer must hold the same positions."""
        keeps = [(layer.positions[:, :, 0] >= before) | torch.isinf(layer.importance) for layer in self.layers]
        for idx, keep in enumerate(keeps):  # every layer before any changes
            counts = keep.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"layer {idx}'s heads hold different tokens: cannot forget by position")
        dropped = []
        for layer, keep in zip(self.layers, keeps):
            dropped.append(len(layer) - int(keep[0].sum()))
            _keep_columns(layer, keep.nonzero()[:, 1].view(keep.shape[0], -1))
        self.evicted += sum(dropped)
        return dropped


def _keep_columns(layer: LayerMemory, keep: torch.Tensor) -> None:
    """Keep, per head, the tokens at sorted indices keep [kv_heads, k]."""
    heads, dim = layer.keys.shape[1], layer.keys.shape[3]
    gather = keep[None, :, :, None].expand(1, heads, keep.shape[1], dim)
    layer.keys = layer.keys.gather(2, gather)
    layer.values = layer.values.gather(2, gather)
    layer.positions = layer.positions.gather(1, keep[:, :, None].expand(-1, -1, 3))
    layer.importance = layer.importance.gather(1, keep)


def check_room(memory: KVMemory, incoming: list[int]) -> None:
    """Refuse a chunk that no eviction can fit: `incoming[l]` new tokens in layer l beyond the budget, or
    more to evict than the layer holds outside the prompt text."""
    if memory.budget is None:
        return
    for idx, (layer, count) in enumerate(zip(memory.layers, incoming)):
        excess = len(layer) + count - memory.budget
        if count > memory.budget or excess > int(torch.isfinite(layer.importance[0]).sum()):
            raise ValueError(
                f"memory budget {memory.budget} tokens per layer cannot hold layer {idx}'s new chunk "
                f"({count} tokens kept) plus the prompt text; raise the budget or lower chunk_frames"
            )


def make_room(memory: KVMemory, incoming: list[int]) -> list[int]:
    """Evict old tokens so that each layer can take `incoming[l]` new ones within the budget.

    Per layer and head, the tokens with the lowest stored importance go first, the oldest first
    among equals (so scoreless policies get a sliding window). Prompt text is never evicted. The
    caller has checked that they fit (check_room). Returns the number of tokens evicted per layer.
    """
    if memory.budget is None:
        return [0] * len(memory.layers)
    excesses = [max(len(layer) + count - memory.budget, 0) for layer, count in zip(memory.layers, incoming)]
    for layer, excess in zip(memory.layers, excesses):
        if excess == 0:
            continue
        order = torch.sort(layer.importance, dim=1, stable=True).indices  # stable: oldest first among ties
        keep = order[:, excess:].sort(dim=1).values  # back to position order
        _keep_columns(layer, keep)
    memory.evicted += sum(excesses)
    return excesses
