"""The baseline policies, sharing EMLoC's interface and memory accounting (memory/emloc.py):
`full`, `uniform` and `pyramid` (the probe's importance at fixed ratios), `window` (attention
sinks + most recent tokens, StreamingLLM-style), `recent` (the newest frames only) and `random`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from memory.policy import ChunkContext, MemoryPolicy, ProbeScores, ScoringPolicy, Selection, check_ratio
from memory.probe import keep_top, kept_indices
from memory.store import KVMemory


@dataclass(kw_only=True)
class FullPolicy(MemoryPolicy):
    """Keep every token: the memory equals the full context."""

    name = "full"

    def select(self, ctx: ChunkContext) -> Selection:
        return Selection(kept=None)


@dataclass(kw_only=True)
class UniformRatios(ScoringPolicy):
    """Ratios: the same fraction of each chunk's video tokens in every layer."""

    ratio: float = 0.1  # fraction of each chunk's video tokens every layer keeps

    def __post_init__(self):
        super().__post_init__()
        check_ratio(f"{self.name} ratio", self.ratio)

    def ratios(self, ctx: ChunkContext) -> list[float]:
        return [self.ratio] * ctx.model.num_layers


def pyramid_ratios(ratio: float, beta: float, layers: int) -> list[float]:
    """Linearly decreasing with depth, mean `ratio` (PyramidKV); clipped to 1 in the lowest layers."""
    low = ratio / beta
    high = 2 * ratio - low
    if layers == 1:
        return [ratio]
    return [min(1.0, high - (high - low) * layer / (layers - 1)) for layer in range(layers)]


@dataclass(kw_only=True)
class PyramidRatios(ScoringPolicy):
    """Ratios: more in lower layers, fewer in upper ones, at the same total as UniformRatios at `ratio`."""

    ratio: float = 0.1  # mean fraction kept over layers: the same total as uniform at this ratio
    beta: float = 20.0  # PyramidKV's steepness: the top layer keeps ratio / beta

    def __post_init__(self):
        super().__post_init__()
        check_ratio(f"{self.name} ratio", self.ratio)
        if not (self.beta >= 1 and math.isfinite(self.beta)):
            raise ValueError(f"{self.name} beta must be a finite number >= 1, got {self.beta}")

    def ratios(self, ctx: ChunkContext) -> list[float]:
        return pyramid_ratios(self.ratio, self.beta, ctx.model.num_layers)


@dataclass(kw_only=True)
class RandomScores(ScoringPolicy):
    """Scores: uniform random, per layer and head, from its own seeded generator."""

    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False, compare=False)
    evict_by_score = False  # its draws say nothing about a token: evictions go by the memory's own order

    def __post_init__(self):
        super().__post_init__()
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, ctx: ChunkContext) -> list[torch.Tensor]:
        return [torch.rand(ctx.model.kv_heads, ctx.chunk_len, generator=self.generator)
                for _ in range(ctx.model.num_layers)]


@dataclass(kw_only=True)
class UniformPolicy(UniformRatios, ProbeScores):
    """The same ratio in every layer, tokens chosen by the probe's importance."""

    name = "uniform"


@dataclass(kw_only=True)
class PyramidPolicy(PyramidRatios, ProbeScores):
    """More tokens in lower layers, fewer in upper ones, at a fixed total, chosen by the probe's importance."""

    name = "pyramid"


@dataclass(kw_only=True)
class RandomPolicy(UniformRatios, RandomScores):
    """A random subset of each chunk per layer and head: the floor any scoring must beat."""

    name = "random"


@dataclass(kw_only=True)
class WindowPolicy(MemoryPolicy):
    """StreamingLLM-style: attention sinks plus the most recent tokens. With a budget, the memory
    forgets its oldest frame pairs to make room (forget_before), so it is a sliding window whatever
    the memory's eviction rule."""

    name = "window"
    ratio: float = 0.1  # fraction of each chunk kept: its most recent video tokens
    sink_tokens: int = 4  # first video tokens of the stream, kept for good (attention sinks)

    def __post_init__(self):
        check_ratio("window ratio", self.ratio)
        if self.sink_tokens < 0:
            raise ValueError(f"window sink_tokens must be >= 0, got {self.sink_tokens}")

    def select(self, ctx: ChunkContext) -> Selection:
        order = torch.arange(ctx.chunk_len, dtype=torch.float32)  # newer = more important
        recency = order + ctx.memory.full_tokens  # comparable across chunks: older chunks score lower
        if ctx.memory.temporal_groups == 0:  # first chunk: its first video tokens are the sinks
            video = (~ctx.protected).nonzero()[:, 0]
            recency[video[:self.sink_tokens]] = float("inf")
        layers = ctx.model.num_layers
        scores = recency.expand(ctx.model.kv_heads, -1).contiguous()
        keep = keep_top(scores, ctx.protected | torch.isinf(recency), self.ratio)
        return Selection([kept_indices(keep)] * layers, [scores] * layers, report=dict(ratios=[self.ratio] * layers),
                         forget_before=window_start(ctx.memory, int(keep[0].sum())))


def window_start(memory: KVMemory, incoming: int) -> int | None:
    """The earliest temporal position a memory that holds the same tokens in every layer and head can keep so
    that `incoming` more tokens per layer fit its budget (None: no budget, or no need to forget)."""
    held = memory.layers[0]
    if memory.budget is None or len(held) + incoming <= memory.budget:
        return None
    video = torch.isfinite(held.importance[0])
    times = held.positions[0, video, 0]  # in stream order
    room = memory.budget - incoming - int((~video).sum())  # video tokens that can stay
    if room <= 0:
        return int(times.max()) + 1
    newest = times[-room:]
    return int(newest[0]) + (1 if bool((times == newest[0]).sum() > (newest == newest[0]).sum()) else 0)


@dataclass(kw_only=True)
class RecentPolicy(MemoryPolicy):
    """Only the newest `frames` frames: the memory forgets every older frame. Streaming benchmarks report a
    4-frame window beating memory methods on questions about the present, so it belongs in every table."""

    name = "recent"
    frames: int = 4  # rounded up to whole frame pairs, the unit the model encodes and positions

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"recent frames must be >= 1, got {self.frames}")

    def select(self, ctx: ChunkContext) -> Selection:
        video = ~ctx.protected
        times = ctx.positions[:, 0]
        held = ctx.memory.layers[0]  # every layer and head holds the same frames under this policy
        stored = held.positions[0, torch.isfinite(held.importance[0]), 0]
        newest = torch.cat([stored.cpu(), times[video]]).unique()[-math.ceil(self.frames / 2):]
        since = int(newest[0])
        keep = (ctx.protected | (times >= since)).expand(ctx.model.kv_heads, -1)
        scores = times.float().expand(ctx.model.kv_heads, -1).contiguous()  # older = evicted first under a budget
        layers = ctx.model.num_layers
        return Selection([kept_indices(keep)] * layers, [scores] * layers, forget_before=since)


@dataclass(kw_only=True)
class LayerRatios(ProbeScores):
    """Keeps layer_ratios[l] of each chunk's video tokens in layer l (probe-ranked, as uniform does), every
    layer it does not name whole: one layer pruned alone (how much the answers need that layer's memory), or a
    whole layer profile at a fixed size (how well the profile spends it: `streamer calibrate`)."""

    name = "layer ratios"
    layer_ratios: dict[int, float]

    def __post_init__(self):
        super().__post_init__()
        for layer, ratio in self.layer_ratios.items():
            check_ratio(f"layer {layer}'s ratio", ratio)

    def ratios(self, ctx: ChunkContext) -> list[float]:
        return [self.layer_ratios.get(layer, 1.0) for layer in range(ctx.model.num_layers)]
