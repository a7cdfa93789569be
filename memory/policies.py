"""Memory policies: after a chunk is prefilled, a policy decides which of its tokens each layer keeps.

A policy is a small class with a dataclass config. It sees a `ChunkContext` (the chunk's new
keys/values per layer, their positions, which tokens are protected text, and the runner for
any extra forwards it needs) and returns, per layer, the indices of the chunk tokens to keep
in every KV head ([kv_heads, k], the same k for all heads of a layer), or None to keep all.
The memory then appends the kept tokens in position order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from memory.store import KVMemory, MemoryView


@dataclass
class ChunkContext:
    memory: "KVMemory"  # the memory before this chunk is committed
    view: "MemoryView"  # memory + the chunk's new keys/values, per layer
    positions: torch.Tensor  # [chunk_len, 3] absolute positions of the chunk's tokens
    protected: torch.Tensor  # [chunk_len] bool: text tokens that every policy keeps
    runner: Any = None  # the model runner, for policies that run probe forwards

    @property
    def chunk_len(self) -> int:
        return self.positions.shape[0]


@dataclass
class Selection:
    kept: list[torch.Tensor] | None  # per layer [kv_heads, k] sorted chunk indices; None keeps everything
    report: dict = field(default_factory=dict)  # what the policy chose, for the per-chunk report


class MemoryPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def select(self, ctx: ChunkContext) -> Selection: ...


@dataclass
class FullConfig:
    pass


class FullPolicy(MemoryPolicy):
    """Keep every token: the memory equals the full context."""

    name = "full"

    def __init__(self, config: FullConfig | None = None):
        self.config = config or FullConfig()

    def select(self, ctx: ChunkContext) -> Selection:
        return Selection(kept=None)


POLICIES: dict[str, tuple[type[MemoryPolicy], type]] = {
    FullPolicy.name: (FullPolicy, FullConfig),
}


def make_policy(name: str, **options) -> MemoryPolicy:
    """Build a policy by name; unknown names and options are refused with the valid choices."""
    if name not in POLICIES:
        raise ValueError(f"unknown memory policy {name!r}; choose one of {', '.join(POLICIES)}")
    policy_cls, config_cls = POLICIES[name]
    try:
        config = config_cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for memory policy {name!r}: {exc}") from None
    return policy_cls(config)
