"""What a memory policy sees and returns, and the small interface through which it reaches the model.

After a chunk is prefilled, a policy decides which of its tokens each layer keeps. It sees a
`ChunkContext`: the memory as it was before the chunk, the chunk's absolute positions, which
of its tokens are protected prompt text, and `model`, a `ChunkModel` -- the model with the
memory and this chunk in its context, offering only what a policy may ask of it (its shape and
probe forwards, memory/probe.py). The engine implements ChunkModel (streamer/engine/probing.py);
tests implement it with fakes. A policy returns a `Selection`: per layer, the indices of the chunk tokens every
KV head keeps ([kv_heads, k], the same k for all heads of a layer; None keeps everything), and
optionally per-token importance, which ranks the chunk's tokens for evictions under a budget,
and optionally a temporal position before which the memory forgets what it holds (`recent`).
Protected tokens are always kept.

A policy is one dataclass: its fields are its options (what configs and clients may set), its
`__post_init__` checks them, `select` does the work (see memory/baselines.py, memory/emloc.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from memory.probe import ChunkModel, ChunkProbe, ProbeConfig, chunk_importance, keep_top, kept_indices
from memory.store import KVMemory


@dataclass
class ChunkContext:
    memory: KVMemory  # the memory before this chunk is committed
    positions: torch.Tensor  # [chunk_len, 3] absolute positions of the chunk's tokens
    protected: torch.Tensor  # [chunk_len] bool: prompt text that every policy keeps
    model: ChunkModel

    @property
    def chunk_len(self) -> int:
        return self.positions.shape[0]


@dataclass
class Selection:
    kept: list[torch.Tensor] | None  # per layer [kv_heads, k] sorted chunk indices; None keeps everything
    scores: list[torch.Tensor] | None = None  # per layer [kv_heads, chunk_len] importance, for evictions
    report: dict = field(default_factory=dict)  # what the policy chose, for the per-chunk report
    timings: dict = field(default_factory=dict)  # seconds per policy stage
    # set: the memory forgets its video tokens whose temporal position is below this before the chunk is added
    forget_before: int | None = None


def check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")


@dataclass
class MemoryPolicy:
    name: ClassVar[str]

    def select(self, ctx: ChunkContext) -> Selection:
        raise NotImplementedError


@dataclass
class ProbedPolicy(MemoryPolicy):
    """A policy that scores chunk tokens with the probe. `probe` comes from the [probe] section of a
    config, not from the policy's own options."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        self.probe.validate()

    def run_probes(self, ctx: ChunkContext) -> list[ChunkProbe]:
        return [ctx.model.probe(prompt, self.probe) for prompt in self.probe.prompts]

    def select_ratios(self, ctx: ChunkContext, ratios: list[float]) -> Selection:
        """Keep ratios[l] of the chunk's video tokens in layer l, by probe importance."""
        start = time.perf_counter()
        scores = chunk_importance(self.run_probes(ctx), self.probe.smoothing)
        kept = [kept_indices(keep_top(s, ctx.protected, r)) for s, r in zip(scores, ratios)]
        return Selection(kept, scores, report=dict(ratios=ratios), timings=dict(probe=time.perf_counter() - start))
