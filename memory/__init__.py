"""Key/value memory of a video stream and the policies that decide what it keeps."""

from memory.policies import POLICIES, ChunkContext, FullPolicy, MemoryPolicy, make_policy
from memory.store import KVMemory, LayerMemory, MemoryView

__all__ = ["POLICIES", "ChunkContext", "FullPolicy", "KVMemory", "LayerMemory", "MemoryPolicy", "MemoryView",
           "make_policy"]
