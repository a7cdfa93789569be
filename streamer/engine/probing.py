"""The model as a memory policy sees it while a chunk is ingested: memory.probe.ChunkModel.

A probe is a prompt laid out as a question turn after the memory and the full chunk, plus
`answer_tokens` tokens the model generates greedily after it; one recorded forward over it
leaves the hidden state entering every layer, the attention to every context key and the
reference logits (streamer/engine/decode.py). This module turns that into the policy's terms:
attention to the chunk's tokens only, and re-runs that hide chunk tokens per layer and head.
"""

from __future__ import annotations

import torch

from memory.probe import ProbeConfig
from streamer.engine.decode import ProbeForward
from streamer.engine.text_model import TextModel
from streamer.engine.view import MemoryView


class RecordedProbe:
    """memory.probe.ChunkProbe over one recorded probe forward."""

    def __init__(self, forward: ProbeForward, chunk_starts: list[int], chunk_len: int):
        self.forward, self.chunk_starts = forward, chunk_starts
        self.attention = [a[:, start:start + chunk_len] for a, start in zip(forward.attention, chunk_starts)]
        self.reference = forward.reference

    def rerun(self, from_layer: int, keeps: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        visibles = [{layer: torch.cat([kept.new_ones(kept.shape[0], self.chunk_starts[layer]), kept], dim=1)
                     for layer, kept in keep.items()} for keep in keeps]  # the memory before the chunk stays visible
        return self.forward.rerun(from_layer, visibles)


class ChunkProbes:
    """memory.probe.ChunkModel: probe forwards after the memory and the chunk held in `view`."""

    def __init__(self, runner: TextModel, view: MemoryView, chunk_len: int, next_position: int):
        self.runner = runner
        self.num_layers, self.kv_heads = runner.num_layers, runner.kv_heads
        self.context = view.context(chunk_len)
        self.chunk_starts = view.memory_lengths
        self.chunk_len = chunk_len
        self.next_position = next_position  # as if the video ended with this chunk

    def probe(self, prompt: str, config: ProbeConfig) -> RecordedProbe:
        """Greedy answer tokens after the prompt, then one recorded forward over prompt + answer."""
        ids = self.runner.suffix_ids(prompt)
        decoder = self.runner.decoder(len(ids) + config.answer_tokens)
        answer = 0
        if config.answer_tokens:
            logits = decoder.start(self.context, self.next_position, ids, config.answer_tokens)
            for step in range(config.answer_tokens):
                token = int(logits.argmax())
                if config.answer_only and token in self.runner.stop_ids:
                    break
                ids, answer = [*ids, token], answer + 1
                if step + 1 < config.answer_tokens:
                    logits = decoder.step(token)
        # answer_only: the rows that predict the answer's tokens and the <|im_end|> after them
        rows = min(config.js_positions, answer + 1 if config.answer_only else len(ids))
        forward = decoder.probe(self.context, self.next_position, ids, rows=rows)
        return RecordedProbe(forward, self.chunk_starts, self.chunk_len)
