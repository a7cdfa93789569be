"""Questions over a memory that keeps what it evicts: bring back the evicted chunks the question reads most.

With `KVMemory.recall` > 0 the tokens a budget evicts go to host memory instead of away (memory/store.py), so
the device holds no more than the budget while the host holds everything else the policy once kept, or
with `host_budget` what the rank x age rule leaves of it (as ReKV keeps a whole stream's cache on the host and
retrieves per question). Before a question is answered it is run once
as a probe over the device memory and every host token together, recording its attention to each (engine/
decode.py); each evicted chunk scores the attention its tokens received, summed over layers, the mean over
KV heads; the best chunks come back whole (their tokens in every layer) while they fit in `recall` tokens
per layer on average, and the question is answered over the memory with them, in a fork (which recalls
nothing more): the memory itself is unchanged. The probe reads the host keys once per question, the
price of remembering.
"""

from __future__ import annotations

import torch

from memory.store import TOKEN_FIELDS, KVMemory, LayerMemory, append, columns
from streamer.engine.decode import EagerDecoder
from streamer.engine.text_model import TextModel


def recall(runner: TextModel, memory: KVMemory, ids: list[int]) -> KVMemory:
    """The memory with the evicted chunks that `ids` (a question's tokens after the video) attends to most
    brought back, within memory.recall tokens per layer on average; the memory itself if it keeps none."""
    if not memory.recall or not any(len(layer) for layer in memory.host):
        return memory
    device = runner.device
    host = [LayerMemory(*(getattr(layer, name).to(device) for name in TOKEN_FIELDS)) for layer in memory.host]
    context = [(torch.cat([layer.keys, stored.keys], 2), torch.cat([layer.values, stored.values], 2))
               for layer, stored in zip(memory.layers, host)]
    forward = EagerDecoder(runner).probe(context, memory.next_position, ids, rows=1)
    # every head of a layer evicted the same number of each chunk's tokens, so column j is one chunk's in all heads
    chunks = torch.cat([stored.chunk[0] for stored in host])
    received = torch.cat([attention[:, len(layer):].mean(dim=0)
                          for attention, layer in zip(forward.attention, memory.layers)])
    score = torch.zeros(int(chunks.max()) + 1, device=device).index_add_(0, chunks, received.float())
    tokens = torch.bincount(chunks, minlength=score.shape[0])
    room, chosen = memory.recall * len(memory.layers), []
    for chunk in score.argsort(descending=True).tolist():
        if 0 < int(tokens[chunk]) <= room:
            chosen.append(chunk)
            room -= int(tokens[chunk])
    recalled = memory.fork()
    recalled.recall, recalled.host = 0, []  # an answer's memory: what it brought back is in it, once
    picked = torch.tensor(chosen, dtype=torch.long, device=device)
    for layer, stored in zip(recalled.layers, host):
        index = torch.isin(stored.chunk[0], picked).nonzero()[:, 0]
        if len(index):
            append(layer, columns(stored, index.expand(stored.chunk.shape[0], -1)))
    return recalled
