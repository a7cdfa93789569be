"""Key/value memory of a video stream and the policies that decide what it keeps.

Nothing here imports the engine: policies reach the model through memory.probe.ChunkModel.
"""

from memory.policy import ChunkContext, MemoryPolicy, Selection
from memory.probe import ChunkModel, ChunkProbe, ProbeConfig
from memory.registry import POLICIES, make_policy
from memory.store import KVMemory, LayerMemory

__all__ = ["POLICIES", "ChunkContext", "ChunkModel", "ChunkProbe", "KVMemory", "LayerMemory", "MemoryPolicy",
           "ProbeConfig", "Selection", "make_policy"]
