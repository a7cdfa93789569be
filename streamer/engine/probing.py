"""The model as a memory policy sees it while a chunk is ingested: memory.probe.ChunkModel.

A probe is a prompt laid out as a question turn after the memory and the full chunk, plus
`answer_tokens` tokens the model generates greedily after it (drafted from the same probe at the
previous chunk, and checked: decode.greedy_tokens); one recorded forward over it leaves the hidden
state entering every layer, the attention to every context key and the reference logits
(streamer/engine/decode.py). This module turns that into the policy's terms:
attention to the chunk's tokens only, and re-runs that hide chunk tokens per layer and head.
"""

from __future__ import annotations

import torch

from memory.probe import ProbeConfig
from streamer.engine.decode import ProbeForward, greedy_tokens
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

    def __init__(self, runner: TextModel, view: MemoryView, chunk_len: int, next_position: int,
                 drafts: dict[str, list[int]] | None = None):
        """drafts: per prompt, the probe's tokens (prompt and answer) at the previous chunk, to draft from;
        `probed` collects this chunk's, for the next."""
        self.runner = runner
        self.drafts, self.probed = drafts or {}, {}
        self.answer_tokens = self.drafted_tokens = 0
        self.num_layers, self.kv_heads = runner.num_layers, runner.kv_heads
        self.context = view.context(chunk_len)
        self.chunk_starts = view.memory_lengths
        self.chunk_len = chunk_len
        self.next_position = next_position  # as if the video ended with this chunk

    def probe(self, prompt: str, config: ProbeConfig) -> RecordedProbe:
        """Greedy answer tokens after the prompt, then one recorded forward over prompt + answer.

        Where the previous chunk's answer to this prompt is still the greedy one, the recorded forward over it
        is the whole probe: its logits check every token at once."""
        ids, count = self.runner.suffix_ids(prompt), config.answer_tokens
        decoder = self.runner.decoder(len(ids) + count)
        stops = self.runner.stop_ids if config.answer_only else set()
        lookup = self.drafts.get(prompt, [])
        guess = lookup[len(ids):len(ids) + count] if lookup[:len(ids)] == ids else []
        if guess:
            forward = decoder.probe(self.context, self.next_position, ids + guess, rows=len(guess) + 1)
            chosen = forward.reference.argmax(dim=-1).tolist()  # chosen[i]: the greedy token after guess[:i]
            held = next((i for i, token in enumerate(guess) if chosen[i] != token or token in stops), len(guess))
            if held == len(guess) and (held == count or chosen[held] in stops):
                return self._recorded(prompt, ids, guess, len(guess), forward, config)
            # what the check found, then the rest of the guess, as the drafts' source
            lookup = ids + guess[:held] + chosen[held:held + 1] + guess[held + 1:]
        answer, drafted = greedy_tokens(decoder, self.context, self.next_position, ids, count, stops, lookup)
        forward = decoder.probe(self.context, self.next_position, ids + answer,
                                rows=self._rows(config, len(ids), len(answer)))
        return self._recorded(prompt, ids, answer, drafted, forward, config)

    @staticmethod
    def _rows(config: ProbeConfig, prompt: int, answer: int) -> int:
        """The compared rows; answer_only: those that predict the answer's tokens and the <|im_end|> after them."""
        return min(config.js_positions, answer + 1 if config.answer_only else prompt + answer)

    def _recorded(self, prompt: str, ids: list[int], answer: list[int], drafted: int, forward: ProbeForward,
                  config: ProbeConfig) -> RecordedProbe:
        self.probed[prompt] = ids + answer
        rows = self._rows(config, len(ids), len(answer))
        forward.reference = forward.reference[-rows:]
        self.answer_tokens += len(answer)
        self.drafted_tokens += drafted
        return RecordedProbe(forward, self.chunk_starts, self.chunk_len)
