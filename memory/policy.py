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
`__post_init__` checks them, `select` does the work (see memory/baselines.py, memory/emloc.py). One that
only ranks tokens writes `score` and takes a ratio rule (ScoringPolicy): the base does the keeping.
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
    # per layer [kv_heads, chunk_len]: the JS, in multiples of the policy's bound, at which its search first dropped
    # each token (inf: never); a tiered memory compacts by it (memory/store.py eviction_keys). None: no search
    levels: list[torch.Tensor] | None = None


def check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")


@dataclass
class MemoryPolicy:
    name: ClassVar[str]

    def __post_init__(self):  # the end of the chain of checks its parts' __post_init__ make
        pass

    def select(self, ctx: ChunkContext) -> Selection:
        raise NotImplementedError


@dataclass(kw_only=True)
class ScoringPolicy(MemoryPolicy):
    """A policy that only ranks a chunk's tokens (kvpress's ScorerPress): `score` gives each layer's importance
    [kv_heads, chunk_len], `ratios` how much of each layer's video tokens to keep; the base keeps the top of
    every head (protected text always) and hands the scores on to rank the tokens for evictions. A scorer and
    a ratio rule are separate classes (ProbeScores, RandomScores; UniformRatios, PyramidRatios in
    memory/baselines.py), so a policy is one of each: `class PyramidPolicy(PyramidRatios, ProbeScores)`."""

    evict_by_score: ClassVar[bool] = True  # False: the memory's default order ranks its tokens for evictions
    probes: ClassVar[bool] = False  # its scores come from probe forwards (timed as the chunk's "probe" stage)

    def score(self, ctx: ChunkContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def ratios(self, ctx: ChunkContext) -> list[float]:
        raise NotImplementedError

    def select(self, ctx: ChunkContext) -> Selection:
        start = time.perf_counter()
        scores, ratios = self.score(ctx), self.ratios(ctx)
        kept = [kept_indices(keep_top(s, ctx.protected, r)) for s, r in zip(scores, ratios)]
        return Selection(kept, scores if self.evict_by_score else None, report=dict(ratios=ratios),
                         timings=dict(probe=time.perf_counter() - start) if self.probes else {})


@dataclass(kw_only=True)
class ProbedPolicy(MemoryPolicy):
    """A policy that runs the probe. `probe` comes from the [probe] section of a config, not from the
    policy's own options."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        super().__post_init__()
        self.probe.validate()

    def run_probes(self, ctx: ChunkContext) -> list[ChunkProbe]:
        return [ctx.model.probe(prompt, self.probe) for prompt in self.probe.prompts]

    def probe_scores(self, ctx: ChunkContext) -> tuple[list[ChunkProbe], list[torch.Tensor]]:
        """The probe forwards and the importance they give each chunk token, per layer: the one ranking every
        probed policy keeps by (EMLoC's search included)."""
        runs = self.run_probes(ctx)
        return runs, chunk_importance(runs, self.probe.smoothing)


@dataclass(kw_only=True)
class ProbeScores(ScoringPolicy, ProbedPolicy):
    """Scores: the probe's importance (memory/probe.py chunk_importance)."""

    probes = True

    def score(self, ctx: ChunkContext) -> list[torch.Tensor]:
        return self.probe_scores(ctx)[1]
