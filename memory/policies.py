"""Memory policies: after a chunk is prefilled, a policy decides which of its tokens each layer keeps.

A policy is a small class with a dataclass config. It sees a `ChunkContext` (the chunk's new
keys/values in the memory view, their positions, which tokens are protected prompt text, and
the runner for probe forwards) and returns a `Selection`: per layer, the indices of the chunk
tokens every KV head keeps ([kv_heads, k], the same k for all heads of a layer; None keeps
all), and optionally per-token importance, which the memory stores to choose evictions when
a budget is set. Protected tokens are always kept.

Baselines here share the interface and the memory accounting with EMLoC (memory/emloc.py):
`full`, `uniform` and `pyramid` (the probe's importance with fixed ratios), `window`
(attention sinks + most recent tokens, StreamingLLM-style) and `random`.
"""

from __future__ import annotations

import time
from abc import ABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memory.probe import ProbeConfig, chunk_importance, keep_top, kept_indices, run_probe

if TYPE_CHECKING:
    from memory.store import KVMemory, MemoryView


@dataclass
class ChunkContext:
    memory: "KVMemory"  # the memory before this chunk is committed
    view: "MemoryView"  # memory + the chunk's new keys/values, per layer
    positions: torch.Tensor  # [chunk_len, 3] absolute positions of the chunk's tokens
    protected: torch.Tensor  # [chunk_len] bool: prompt text that every policy keeps
    next_position: int  # where text after this chunk starts (probe positions)
    runner: Any = None  # the model runner, for policies that run probe forwards

    @property
    def chunk_len(self) -> int:
        return self.positions.shape[0]


@dataclass
class Selection:
    kept: list[torch.Tensor] | None  # per layer [kv_heads, k] sorted chunk indices; None keeps everything
    scores: list[torch.Tensor] | None = None  # per layer [kv_heads, chunk_len] importance, for evictions
    report: dict = field(default_factory=dict)  # what the policy chose, for the per-chunk report
    timings: dict = field(default_factory=dict)  # seconds per policy stage


def check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")


class MemoryPolicy(ABC):
    name: ClassVar[str]

    def select(self, ctx: ChunkContext) -> Selection:
        raise NotImplementedError


class ProbedPolicy(MemoryPolicy):
    """A policy that scores chunk tokens with the probe (memory.probe)."""

    def __init__(self, probe: ProbeConfig | None):
        self.probe = (probe or ProbeConfig()).validate()

    def run_probes(self, ctx: ChunkContext):
        return [run_probe(ctx.runner, ctx, prompt, self.probe) for prompt in self.probe.prompts]

    def select_ratios(self, ctx: ChunkContext, ratios: list[float]) -> Selection:
        """Keep ratios[l] of the chunk's video tokens in layer l, by probe importance."""
        start = time.perf_counter()
        scores = chunk_importance(ctx, self.run_probes(ctx), self.probe.smoothing)
        kept = [kept_indices(keep_top(s, ctx.protected, r)) for s, r in zip(scores, ratios)]
        return Selection(kept, scores, report=dict(ratios=ratios), timings=dict(probe=time.perf_counter() - start))


@dataclass
class FullConfig:
    pass


class FullPolicy(MemoryPolicy):
    """Keep every token: the memory equals the full context."""

    name = "full"

    def __init__(self, config: FullConfig | None = None, probe: ProbeConfig | None = None):
        self.config = config or FullConfig()

    def select(self, ctx: ChunkContext) -> Selection:
        return Selection(kept=None)


@dataclass
class UniformConfig:
    ratio: float = 0.1  # fraction of each chunk's video tokens every layer keeps


class UniformPolicy(ProbedPolicy):
    """The same ratio in every layer, tokens chosen by the probe's importance."""

    name = "uniform"

    def __init__(self, config: UniformConfig | None = None, probe: ProbeConfig | None = None):
        super().__init__(probe)
        self.config = config or UniformConfig()
        check_ratio("uniform ratio", self.config.ratio)

    def select(self, ctx: ChunkContext) -> Selection:
        return self.select_ratios(ctx, [self.config.ratio] * ctx.runner.num_layers)


@dataclass
class PyramidConfig:
    ratio: float = 0.1  # mean fraction kept over layers: the same total as uniform at this ratio
    beta: float = 20.0  # PyramidKV's steepness: the top layer keeps ratio / beta


def pyramid_ratios(ratio: float, beta: float, layers: int) -> list[float]:
    """Linearly decreasing with depth, mean `ratio` (PyramidKV); clipped to 1 in the lowest layers."""
    low = ratio / beta
    high = 2 * ratio - low
    if layers == 1:
        return [ratio]
    return [min(1.0, high - (high - low) * layer / (layers - 1)) for layer in range(layers)]


class PyramidPolicy(ProbedPolicy):
    """More tokens in lower layers, fewer in upper ones, at a fixed total."""

    name = "pyramid"

    def __init__(self, config: PyramidConfig | None = None, probe: ProbeConfig | None = None):
        super().__init__(probe)
        self.config = config or PyramidConfig()
        check_ratio("pyramid ratio", self.config.ratio)
        if self.config.beta < 1:
            raise ValueError(f"pyramid beta must be >= 1, got {self.config.beta}")

    def select(self, ctx: ChunkContext) -> Selection:
        ratios = pyramid_ratios(self.config.ratio, self.config.beta, ctx.runner.num_layers)
        return self.select_ratios(ctx, ratios)


@dataclass
class WindowConfig:
    ratio: float = 0.1  # fraction of each chunk kept: its most recent video tokens
    sink_tokens: int = 4  # first video tokens of the stream, kept for good (attention sinks)


class WindowPolicy(MemoryPolicy):
    """StreamingLLM-style: attention sinks plus the most recent tokens. With a budget, older
    tokens are evicted first (importance = age), so the memory is a sliding window."""

    name = "window"

    def __init__(self, config: WindowConfig | None = None, probe: ProbeConfig | None = None):
        self.config = config or WindowConfig()
        check_ratio("window ratio", self.config.ratio)
        if self.config.sink_tokens < 0:
            raise ValueError(f"window sink_tokens must be >= 0, got {self.config.sink_tokens}")

    def select(self, ctx: ChunkContext) -> Selection:
        order = torch.arange(ctx.chunk_len, dtype=torch.float32)  # newer = more important
        recency = order + ctx.memory.full_tokens  # comparable across chunks: older chunks score lower
        if ctx.memory.temporal_groups == 0:  # first chunk: its first video tokens are the sinks
            video = (~ctx.protected).nonzero()[:, 0]
            recency[video[:self.config.sink_tokens]] = float("inf")
        heads = ctx.runner.kv_heads
        scores = recency.expand(heads, -1).contiguous()
        sinks = torch.isinf(recency)
        keep = keep_top(scores, ctx.protected | sinks, self.config.ratio)
        return Selection([kept_indices(keep)] * ctx.runner.num_layers, [scores] * ctx.runner.num_layers,
                         report=dict(ratios=[self.config.ratio] * ctx.runner.num_layers))


@dataclass
class RandomConfig:
    ratio: float = 0.1
    seed: int = 0


class RandomPolicy(MemoryPolicy):
    """A random subset of each chunk per layer and head: the floor any scoring must beat."""

    name = "random"

    def __init__(self, config: RandomConfig | None = None, probe: ProbeConfig | None = None):
        self.config = config or RandomConfig()
        check_ratio("random ratio", self.config.ratio)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def select(self, ctx: ChunkContext) -> Selection:
        kept = []
        for _ in range(ctx.runner.num_layers):
            scores = torch.rand(ctx.runner.kv_heads, ctx.chunk_len, generator=self.generator)
            kept.append(kept_indices(keep_top(scores, ctx.protected, self.config.ratio)))
        return Selection(kept, report=dict(ratios=[self.config.ratio] * ctx.runner.num_layers))

