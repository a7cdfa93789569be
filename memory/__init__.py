"""Key/value memory of a video stream and the policies that decide what it keeps."""

from memory.policies import ChunkContext, MemoryPolicy, Selection
from memory.probe import ProbeConfig
from memory.registry import POLICIES, make_policy
from memory.store import KVMemory, LayerMemory, MemoryView

__all__ = ["POLICIES", "ChunkContext", "KVMemory", "LayerMemory", "MemoryPolicy", "MemoryView", "ProbeConfig",
           "Selection", "make_policy"]
