"""Question prefill and greedy decode steps against a memory: eager, or over static buffers.

Both decoders have the same two calls: `start(context, next_position, ids, max_new_tokens)`
runs the question (text positions from `next_position` on) after a context -- per layer the
keys and values of a memory, or of a memory and the chunk being ingested (the probe) -- and
returns the float32 logits of its last token; `step(token)` appends one answer token and
returns the logits after it. The context itself is never modified.

EagerDecoder runs each forward at its exact length (streamer.runner.Runner.forward_layers).

StaticDecoder exists for CUDA graphs. Eager decoding of a 7B model spends most of each step
launching kernels from Python (DESIGN.md section 6: ~29 of 34 ms); a CUDA graph replays a
recorded forward with one launch, but every tensor it touches must keep its address and shape.
So it runs over fixed buffers:
- each layer has `capacity` key/value slots: the memory's M_l tokens in slots [0, M_l), unused
  slots up to `memory_slots`, then the question and its answer from slot `memory_slots` on;
- a forward writes its keys at slots held in a tensor (index_copy_) and attends to the whole
  buffer under a boolean mask: the query in slot s sees memory slot j if j < M_l, and answer
  slot j if memory_slots <= j <= s. Slots never written hold zeros, not garbage that could be
  NaN (a masked NaN still poisons the softmax);
- a question is padded to a bucket length: the pads come after it, so the causal mask hides
  them from it, and the answer's tokens overwrite their slots.
Per buffer size, one graph per question bucket and one for a decode step are recorded on first
use and replayed for every later question of every session (the memory is copied in first).
Without graphs (CPU) the same forwards run eagerly: that is how the tests check this path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from memory.store import MemoryView
from streamer.positions import text_positions

log = logging.getLogger("streamer")

QUESTION_BUCKETS = (16, 32, 64, 128, 256, 512)  # longer questions take the eager path
SLOT_ROUND = 256  # buffer sizes are multiples of this (aligned masks, few distinct shapes)
MEMORY_GROWTH = 1.25  # headroom when a memory outgrows the buffers: regrowth re-records the graphs

Context = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [1, kv_heads, M_l, head_dim]


class EagerDecoder:
    def __init__(self, runner):
        self.runner = runner

    def start(self, context: Context, next_position: int, ids: list[int], max_new_tokens: int) -> torch.Tensor:
        self.view = MemoryView(context, extra=len(ids) + max_new_tokens)
        self.position = next_position
        return self._forward(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._forward([token])

    def _forward(self, ids: list[int]) -> torch.Tensor:
        runner = self.runner
        positions = text_positions(self.position, len(ids))
        self.position += len(ids)
        hidden = runner.forward_layers(runner.embed_tokens(ids), positions, self.view)
        return runner.logits(hidden[:, -1])[0]


@dataclass
class Buffers:
    """The fixed tensors one set of graphs reads and writes."""

    memory_slots: int
    capacity: int
    keys: list[torch.Tensor]  # per layer [1, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    memory_visible: torch.Tensor  # [layers, capacity] bool: slot j < M_l
    columns: torch.Tensor  # arange(capacity)
    first_slot: torch.Tensor  # [1] int64: slot of the forward's first token
    first_position: torch.Tensor  # [1] int64: its text position
    last_row: torch.Tensor  # [1] int64: the row whose logits are returned
    ids: dict[int, torch.Tensor] = field(default_factory=dict)  # per forward length, [1, n]
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = field(default_factory=dict)


class SlotWriter:
    """The cache interface the attention modules call: write new keys at the forward's slots."""

    def __init__(self, buffers: Buffers, slots: torch.Tensor):
        self.buffers, self.slots = buffers, slots

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        b = self.buffers
        b.keys[layer_idx].index_copy_(2, self.slots, keys)
        b.values[layer_idx].index_copy_(2, self.slots, values)
        return b.keys[layer_idx], b.values[layer_idx]


class StaticDecoder:
    def __init__(self, runner, cuda_graphs: bool = True):
        self.runner = runner
        self.cuda_graphs = cuda_graphs and runner.device.type == "cuda"
        self.buffers: Buffers | None = None

    @staticmethod
    def fits(question_tokens: int) -> bool:
        return question_tokens <= QUESTION_BUCKETS[-1]

    def start(self, context: Context, next_position: int, ids: list[int], max_new_tokens: int) -> torch.Tensor:
        if not self.fits(len(ids)):
            raise ValueError(f"question of {len(ids)} tokens is longer than the largest bucket {QUESTION_BUCKETS[-1]}")
        lengths = [keys.shape[2] for keys, _ in context]
        self._reserve(max(lengths), max_new_tokens)
        b = self.buffers
        for idx, (keys, values) in enumerate(context):
            b.keys[idx][:, :, :lengths[idx]].copy_(keys)
            b.values[idx][:, :, :lengths[idx]].copy_(values)
        b.memory_visible.copy_(b.columns < torch.tensor(lengths, device=b.columns.device)[:, None])
        bucket = next(n for n in QUESTION_BUCKETS if n >= len(ids))
        padded = ids + [ids[-1]] * (bucket - len(ids))
        self._input(bucket).copy_(torch.tensor([padded]))
        self.slot, self.position = b.memory_slots, next_position
        self.end = b.memory_slots + len(ids) + max_new_tokens - 1  # the first answer token needs no step
        return self._run(bucket, len(ids))

    def step(self, token: int) -> torch.Tensor:
        if self.slot >= self.end:
            raise RuntimeError("more decode steps than the max_new_tokens given to start()")
        self._input(1).fill_(token)
        return self._run(1, 1)

    # --- buffers and graphs ---------------------------------------------------------------

    def _reserve(self, memory_tokens: int, max_new_tokens: int) -> None:
        """Buffers holding `memory_tokens` per layer, a largest-bucket question and the answer."""
        answer_slots = QUESTION_BUCKETS[-1] + max_new_tokens
        b = self.buffers
        if b is not None and memory_tokens <= b.memory_slots and answer_slots <= b.capacity - b.memory_slots:
            return
        memory_slots = _round_up(memory_tokens if b is None else max(memory_tokens, MEMORY_GROWTH * b.memory_slots))
        if b is not None:
            answer_slots = max(answer_slots, b.capacity - b.memory_slots)
        self.buffers = None  # free the old buffers and graph pools before allocating the new ones
        capacity = memory_slots + _round_up(answer_slots)
        runner = self.runner
        device, dtype = runner.device, runner.model.dtype
        log.info("answer buffers: %d memory + %d answer slots per layer%s", memory_slots, capacity - memory_slots,
                 " (CUDA graphs are recorded on first use)" if self.cuda_graphs else "")

        def slots():
            return torch.zeros(1, runner.kv_heads, capacity, runner.head_dim, device=device, dtype=dtype)

        def scalar():
            return torch.zeros(1, dtype=torch.long, device=device)

        self.buffers = Buffers(
            memory_slots=memory_slots, capacity=capacity,
            keys=[slots() for _ in range(runner.num_layers)], values=[slots() for _ in range(runner.num_layers)],
            memory_visible=torch.zeros(runner.num_layers, capacity, dtype=torch.bool, device=device),
            columns=torch.arange(capacity, device=device), first_slot=scalar(), first_position=scalar(),
            last_row=scalar(),
        )

    def _input(self, n: int) -> torch.Tensor:
        b = self.buffers
        if n not in b.ids:
            b.ids[n] = torch.zeros(1, n, dtype=torch.long, device=b.columns.device)
        return b.ids[n]

    def _run(self, n: int, count: int) -> torch.Tensor:
        """Forward the n tokens in the input buffer, of which the first `count` are real."""
        b = self.buffers
        b.first_slot.fill_(self.slot)
        b.first_position.fill_(self.position)
        b.last_row.fill_(count - 1)
        self.slot += count
        self.position += count
        if not self.cuda_graphs:
            return self._forward(n)
        if n not in b.graphs:
            try:
                b.graphs[n] = self._record(n)
            except RuntimeError as exc:  # an op that cannot be captured: answer correctly, only slower
                log.warning("recording a CUDA graph failed (%s); answering with eager forwards", exc)
                self.cuda_graphs = False
                return self._forward(n)
        graph, logits = b.graphs[n]
        graph.replay()
        return logits

    def _record(self, n: int):
        """Capture the forward of n tokens, after one eager run (lazy initialisations, kernel choices)."""
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):  # the warm-up writes the same slots the replay will
            self._forward(n)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(n)
        return graph, logits

    def _forward(self, n: int) -> torch.Tensor:
        runner, b = self.runner, self.buffers
        offsets = b.columns[:n]
        slots = b.first_slot + offsets
        position_ids = (b.first_position + offsets).view(1, 1, n).expand(3, 1, n)
        hidden = runner.language_model.embed_tokens(b.ids[n])
        rotary = runner.language_model.rotary_emb(hidden, position_ids)
        answer_visible = (b.columns >= b.memory_slots) & (b.columns <= slots[:, None])  # [n, capacity]
        writer = SlotWriter(b, slots)
        for idx, layer in enumerate(runner.language_model.layers):
            hidden = layer(hidden, attention_mask=answer_visible | b.memory_visible[idx], past_key_values=writer,
                           use_cache=True, position_embeddings=rotary)
        return runner.logits(hidden.index_select(1, b.last_row))[0, 0]


def _round_up(tokens: float) -> int:
    return max(1, math.ceil(tokens / SLOT_ROUND)) * SLOT_ROUND
