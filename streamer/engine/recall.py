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

With `KVMemory.focus` > 0 a question reads ONLY the chunks it attends to most, from the device and (with recall)
the host alike, while they fit in `focus` tokens per layer on average, plus the prompt's text: as ReKV answers
from the retrieved chunks alone. A question about one part of a long stream then reads that part without the
rest of the stream around it (docs/MEMORY.md: how a model trained on single videos reads many).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from memory.store import TOKEN_FIELDS, KVMemory, LayerMemory, append, columns
from streamer.engine.decode import EagerDecoder
from streamer.engine.text_model import TextModel


def recall(runner: TextModel, memory: KVMemory, ids: list[int]) -> KVMemory:
    """The memory with the evicted chunks that `ids` (a question's tokens after the video) attends to most
    brought back, within memory.recall tokens per layer on average; with memory.focus, only the chunks it attends
    to most, within memory.focus; the memory itself if it keeps nothing on the host and has no focus."""
    hosted = memory.recall and any(len(layer) for layer in memory.host)
    if not hosted and not memory.focus:
        return memory
    device = runner.device
    host = [LayerMemory(*(getattr(layer, name).to(device) for name in TOKEN_FIELDS)) for layer in memory.host] \
        if hosted else [None] * len(memory.layers)
    context = [(torch.cat([layer.keys, part.keys], 2), torch.cat([layer.values, part.values], 2)) if part is not None
               else (layer.keys, layer.values) for layer, part in zip(memory.layers, host)]
    forward = EagerDecoder(runner).probe(context, memory.next_position, ids, rows=1)
    if memory.focus:
        return _focus(memory, host, forward.attention)
    # every head of a layer evicted the same number of each chunk's tokens, so column j is one chunk's in all heads
    chunks = torch.cat([stored.chunk[0] for stored in host])
    received = torch.cat([attention[:, len(layer):].mean(dim=0)
                          for attention, layer in zip(forward.attention, memory.layers)])
    score = torch.zeros(int(chunks.max()) + 1, device=device).index_add_(0, chunks, received.float())
    tokens = torch.bincount(chunks, minlength=score.shape[0])
    picked = _best_chunks(score, tokens.float(), memory.recall * len(memory.layers))
    recalled = memory.fork()
    recalled.recall, recalled.host = 0, []  # an answer's memory: what it brought back is in it, once
    for layer, stored in zip(recalled.layers, host):
        index = torch.isin(stored.chunk[0], picked).nonzero()[:, 0]
        if len(index):
            append(layer, columns(stored, index.expand(stored.chunk.shape[0], -1)))
    return recalled


def _best_chunks(score: torch.Tensor, tokens: torch.Tensor, room: float) -> torch.Tensor:
    """The chunks of highest score, best first, while their tokens (summed over layers) fit in `room`."""
    chosen = []
    for chunk in score.argsort(descending=True).tolist():
        if 0 < float(tokens[chunk]) <= room:
            chosen.append(chunk)
            room -= float(tokens[chunk])
    return torch.tensor(chosen, dtype=torch.long, device=score.device)


def _focus(memory: KVMemory, host: list[LayerMemory | None], attention: list[torch.Tensor]) -> KVMemory:
    """A memory of the chunks the probe's `attention` (per layer [kv_heads, device + host tokens]) went to most,
    within memory.focus tokens per layer on average, and every text token; scored as recall scores them."""
    layers = []
    for layer, part in zip(memory.layers, host):
        readable = replace(layer)
        if part is not None:
            append(readable, part)
        layers.append(readable)
    count = int(max(int(layer.chunk.max()) for layer in layers if layer.chunk.numel())) + 1
    device = attention[0].device
    score, tokens = torch.zeros(count, device=device), torch.zeros(count, device=device)
    for layer, received in zip(layers, attention):
        video = torch.isfinite(layer.importance)  # text (the prompt) is always read
        heads = layer.chunk.shape[0]
        score.index_add_(0, layer.chunk[video], received[video].float() / heads)
        tokens.index_add_(0, layer.chunk[video], torch.full_like(received[video], 1.0 / heads, dtype=torch.float))
    picked = _best_chunks(score, tokens, memory.focus * len(layers))
    focused = memory.fork()
    focused.recall, focused.focus, focused.host = 0, 0, []  # an answer's memory: read as it is
    for i, layer in enumerate(layers):
        keep = torch.isin(layer.chunk, picked) | ~torch.isfinite(layer.importance)
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):  # every head keeps the same count of each chunk's tokens
            raise RuntimeError(f"layer {i} holds different numbers of a chunk's tokens per head: cannot focus")
        focused.layers[i] = columns(layer, keep.nonzero()[:, 1].view(keep.shape[0], -1))
    return focused
