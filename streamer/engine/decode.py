"""Short forwards after a context: answers, and the probe forwards of the memory policies.

A context is, per layer, the keys and values a forward attends to: a memory, or a memory
plus the chunk being ingested. It is never modified. Both decoders offer the same calls:
- `start(context, next_position, ids, max_new_tokens)` runs a question (text positions from
  `next_position` on) and returns the float32 logits of its last token; `step(token)` appends
  one answer token and returns the logits after it. Both are `begin(context, next_position, room)`
  (room: tokens that may be written after the context) then `extend(ids, rows)`, which appends any
  number of tokens and returns the logits after each of the last `rows`; `back(count)` forgets the
  last `count` appended, so drafted tokens the model would not have chosen cost no copy (greedy_tokens);
- `probe(context, next_position, ids, rows)` runs a probe, recording its attention over the
  context, the hidden state entering every layer and the logits of its last `rows` tokens;
  `rerun(probe, from_layer, visibles)` re-runs it from a layer's stored input with context keys
  hidden per layer and KV head, once per entry of `visibles` -- the pruning candidates of
  memory.emloc. The eager decoder runs them all in one forward: each candidate's copy of the probe
  is a block of rows that sees the context through its own mask and only its own probe keys.

EagerDecoder runs each forward at its exact length, as a streamer.engine.packed.Segment: alone, or packed with
other sessions' forwards where chunks are ingested together (streamer.engine.together).

StaticDecoder exists for CUDA graphs. Eager forwards of a few tokens on a 7B model spend most of
their time launching kernels from Python (docs/DESIGN.md section 8: ~29 of 34 ms per decode step); a
CUDA graph replays a recorded forward with one launch, but every tensor it touches must keep its
address and shape. So it runs over fixed buffers:
- each layer has `capacity` key/value slots: the context's M_l tokens in slots [0, M_l), unused
  slots up to `context_slots`, then the question (or probe) and its answer from there on;
- a forward writes its keys at slots held in a tensor (index_copy_) and attends to the whole
  buffer under a boolean mask: the query in slot s sees context slot j if the KV head's row of
  `visible_keys` says so (j < M_l, minus any hidden keys), and slot j >= context_slots if j <= s.
  Slots never written hold zeros, not garbage that could be NaN (a masked NaN still poisons the
  softmax);
- inputs are padded to a bucket length: the pads come after the real tokens, so the causal mask
  hides them from those, and an answer's tokens overwrite their slots.
Per buffer size, graphs (one per kind of forward and bucket) are recorded on first use and
replayed for every later forward of every session (the context is copied in first). Without
graphs (CPU) the same forwards run eagerly: that is how the tests check this path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamer.engine.attention import run_layer
from streamer.engine.packed import Segment, run_segments
from streamer.engine.positions import text_positions
from streamer.engine.text_model import TextModel
from streamer.engine.view import MemoryView

log = logging.getLogger("streamer")

BUCKETS = (16, 32, 64, 128, 256, 512)  # padded input lengths; longer inputs take the eager path
SLOT_ROUND = 256  # buffer sizes are multiples of this (aligned masks, few distinct shapes)
CONTEXT_GROWTH = 1.25  # headroom for a growing context: each regrowth re-records the graphs

Context = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [1, kv_heads, M_l, head_dim]


@dataclass
class ProbeForward:
    """What a recorded probe forward leaves for the policy and for re-runs."""

    next_position: int
    count: int  # probe tokens
    layer_inputs: torch.Tensor  # [layers, 1, n, hidden]: the hidden state entering each layer (n >= count)
    attention: list[torch.Tensor]  # per layer [kv_heads, M_l] float32: probe attention to each context key,
    #                                mean over the query heads of a KV head, summed over probe tokens
    reference: torch.Tensor  # [rows, vocab] float32 logits of the last `rows` probe tokens
    decoder: "EagerDecoder | StaticDecoder"  # holds the context until the next forward after another one

    def rerun(self, from_layer: int, visibles: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        return self.decoder.rerun(self, from_layer, visibles)


class EagerDecoder:
    def __init__(self, runner: TextModel, run: Callable[[Segment], torch.Tensor] | None = None):
        """run: how a forward runs (default: at once, alone); a chunk ingested together hands its forwards to
        streamer.engine.together, which packs them with the other chunks'."""
        self.runner = runner
        self.run = run or (lambda segment: run_segments(runner, [segment])[0])

    def start(self, context: Context, next_position: int, ids: list[int], max_new_tokens: int) -> torch.Tensor:
        self.begin(context, next_position, len(ids) + max_new_tokens)
        return self.extend(ids)[0]

    def step(self, token: int) -> torch.Tensor:
        return self.extend([token])[0]

    def begin(self, context: Context, next_position: int, room: int) -> None:
        self.view = MemoryView(context, extra=room)
        self.position, self.written = next_position, 0

    def extend(self, ids: list[int], rows: int = 1) -> torch.Tensor:
        positions = text_positions(self.position, len(ids))
        self.position += len(ids)
        self.written += len(ids)
        return self.run(Segment(self.view, positions, ids=ids, rows=_last(rows, len(ids))))

    def back(self, count: int) -> None:
        self.position -= count
        self.written -= count
        self.view.rewind(self.written)

    def probe(self, context: Context, next_position: int, ids: list[int], rows: int) -> ProbeForward:
        runner = self.runner
        self.view = MemoryView(context, extra=len(ids))
        self.context = context  # a re-run of a longer probe than the last needs a larger view
        lengths = self.view.memory_lengths
        attention: list[torch.Tensor | None] = [None] * runner.num_layers

        def record(layer: int, probs: torch.Tensor) -> None:  # probs [kv_heads, groups, p, kv]
            attention[layer] = probs[..., :lengths[layer]].mean(dim=1).sum(dim=1)

        layer_inputs: list[torch.Tensor] = []
        reference = self.run(Segment(self.view, text_positions(next_position, len(ids)), ids=ids,
                                     rows=_last(rows, len(ids)), recorder=record, layer_inputs=layer_inputs))
        self.view.rewind(0)
        return ProbeForward(next_position, len(ids), torch.stack(layer_inputs), attention, reference, self)

    def rerun(self, probe: ProbeForward, from_layer: int,
              visibles: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Per candidate, logits [rows, vocab] with the context keys of layer l limited to visible[l] (bool
        [kv_heads, M_l]); all candidates in one forward of len(visibles) copies of the probe."""
        runner, n, copies = self.runner, probe.count, len(visibles)
        if not visibles:
            return []
        if self.view.keys[0].shape[2] - self.view.memory_lengths[0] < copies * n:
            self.view = MemoryView(self.context, extra=copies * n)
        layers = range(from_layer, runner.num_layers)
        # each copy sees its own probe keys, causally, and no other copy's
        own = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril()] * copies).to(runner.device)
        key_masks = {}
        for layer in layers:
            length = self.view.memory_lengths[layer]
            context = torch.stack([v[layer] if layer in v else torch.ones(runner.kv_heads, length, dtype=torch.bool,
                                                                          device=runner.device) for v in visibles])
            rows = context.permute(1, 0, 2).repeat_interleave(n, dim=1)  # [kv_heads, copies * n, M_l]
            key_masks[layer] = torch.cat([rows, own.expand(runner.kv_heads, -1, -1)], dim=2)
        rows = probe.reference.shape[0]
        logits = self.run(Segment(self.view, text_positions(probe.next_position, n).repeat(copies, 1),
                                  hidden=probe.layer_inputs[from_layer].repeat(1, copies, 1), start=from_layer,
                                  rows=[r for c in range(copies) for r in _last(rows, (c + 1) * n)],
                                  key_masks=key_masks))
        self.view.rewind(0)
        return list(logits.split(rows))


@dataclass
class Buffers:
    """The fixed tensors the graphs read and write."""

    context_slots: int
    capacity: int
    keys: list[torch.Tensor]  # per layer [1, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    context_visible: torch.Tensor  # [layers, kv_heads, capacity] bool: slot j < M_l
    visible_keys: torch.Tensor  # the same, minus keys a probe re-run hides
    attention: torch.Tensor  # [layers, kv_heads, capacity] float32: a probe's recorded attention
    columns: torch.Tensor  # arange(capacity)
    first_slot: torch.Tensor  # [1] int64: slot of the forward's first token
    first_position: torch.Tensor  # [1] int64: its text position
    last_row: torch.Tensor  # [1] int64: the last real (unpadded) row
    ids: dict[int, torch.Tensor] = field(default_factory=dict)  # per padded length n, [1, n]
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # per n, [layers, 1, n, hidden]
    graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = field(default_factory=dict)


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
    def __init__(self, runner: TextModel, cuda_graphs: bool = True):
        self.runner = runner
        self.cuda_graphs = cuda_graphs and runner.device.type == "cuda"
        self.buffers: Buffers | None = None

    @staticmethod
    def fits(tokens: int) -> bool:
        return tokens <= BUCKETS[-1]

    def start(self, context: Context, next_position: int, ids: list[int], max_new_tokens: int) -> torch.Tensor:
        self.begin(context, next_position, len(ids) + max_new_tokens - 1)  # the first answer token needs no step
        return self.extend(ids)[0]

    def step(self, token: int) -> torch.Tensor:
        return self.extend([token])[0]

    def begin(self, context: Context, next_position: int, room: int) -> None:
        self._load(context, room)
        self.slot, self.position = self.buffers.context_slots, next_position
        self.end = self.slot + room

    def extend(self, ids: list[int], rows: int = 1) -> torch.Tensor:
        if self.slot + len(ids) > self.end:
            raise RuntimeError("more decode steps than the max_new_tokens given to start()")
        return self._run(("forward", self._write(ids), rows), len(ids))

    def back(self, count: int) -> None:
        """The slots past the new end are written again before a query may see them (the causal mask)."""
        self.slot -= count
        self.position -= count

    def probe(self, context: Context, next_position: int, ids: list[int], rows: int) -> ProbeForward:
        self._load(context, 0)
        n = self._write(ids)
        b = self.buffers
        if n not in b.layer_inputs:
            b.layer_inputs[n] = b.keys[0].new_zeros(self.runner.num_layers, 1, n, self.runner.hidden_size)
        self.slot, self.position = b.context_slots, next_position
        reference = self._run(("probe", n, rows), len(ids)).clone()
        lengths = [keys.shape[2] for keys, _ in context]
        attention = [b.attention[layer, :, :length].clone() for layer, length in enumerate(lengths)]
        return ProbeForward(next_position, len(ids), b.layer_inputs[n].clone(), attention, reference, self)

    def rerun(self, probe: ProbeForward, from_layer: int,
              visibles: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        """One replay per candidate (its buffers hold one probe); clones, as each replay rewrites the logits."""
        return [self._rerun(probe, from_layer, visible).clone() for visible in visibles]

    def _rerun(self, probe: ProbeForward, from_layer: int, visible: dict[int, torch.Tensor]) -> torch.Tensor:
        b = self.buffers
        n = probe.layer_inputs.shape[2]
        b.layer_inputs[n][from_layer].copy_(probe.layer_inputs[from_layer])
        b.visible_keys.copy_(b.context_visible)  # undo the last re-run's hidden keys (every _load does too)
        for layer, mask in visible.items():
            if layer >= from_layer:
                b.visible_keys[layer, :, :mask.shape[1]] = mask
        self.slot, self.position = b.context_slots, probe.next_position
        return self._run(("rerun", n, probe.reference.shape[0], from_layer), probe.count)

    # --- buffers and graphs ---------------------------------------------------------------

    def _load(self, context: Context, room: int) -> None:
        """Copy the context into the buffers, with `room` slots after it (and a bucket's pads)."""
        lengths = [keys.shape[2] for keys, _ in context]
        self._reserve(max(lengths), BUCKETS[-1] + room)
        b = self.buffers
        for layer, (keys, values) in enumerate(context):
            b.keys[layer][:, :, :lengths[layer]].copy_(keys)
            b.values[layer][:, :, :lengths[layer]].copy_(values)
        limits = torch.tensor(lengths, device=b.columns.device)[:, None, None]
        b.context_visible.copy_((b.columns < limits).expand_as(b.context_visible))
        b.visible_keys.copy_(b.context_visible)

    def _write(self, ids: list[int]) -> int:
        """Copy the ids, padded to a bucket (a single token is its own), into the input; returns the padded length."""
        if not self.fits(len(ids)):
            raise ValueError(f"{len(ids)} tokens is longer than the largest bucket {BUCKETS[-1]}")
        n = 1 if len(ids) == 1 else next(n for n in BUCKETS if n >= len(ids))
        self._input(n).copy_(torch.tensor([ids + [ids[-1]] * (n - len(ids))]))
        return n

    def _reserve(self, context_tokens: int, answer_slots: int) -> None:
        """Buffers with room for `context_tokens` per layer and `answer_slots` after them."""
        b = self.buffers
        if b is not None and context_tokens <= b.context_slots and answer_slots <= b.capacity - b.context_slots:
            return
        context_slots = _round_up(CONTEXT_GROWTH * max(context_tokens, b.context_slots if b else 0))
        if b is not None:
            answer_slots = max(answer_slots, b.capacity - b.context_slots)
        self.buffers = None  # free the old buffers and graph pools before allocating the new ones
        capacity = context_slots + _round_up(answer_slots)
        runner = self.runner
        device, dtype, layers, heads = runner.device, runner.model.dtype, runner.num_layers, runner.kv_heads
        log.info("static decoder buffers: %d context + %d answer slots per layer%s", context_slots,
                 capacity - context_slots, " (CUDA graphs are recorded on first use)" if self.cuda_graphs else "")

        def slots():
            return torch.zeros(1, heads, capacity, runner.head_dim, device=device, dtype=dtype)

        def scalar():
            return torch.zeros(1, dtype=torch.long, device=device)

        self.buffers = Buffers(
            context_slots=context_slots, capacity=capacity,
            keys=[slots() for _ in range(layers)], values=[slots() for _ in range(layers)],
            context_visible=torch.zeros(layers, heads, capacity, dtype=torch.bool, device=device),
            visible_keys=torch.zeros(layers, heads, capacity, dtype=torch.bool, device=device),
            attention=torch.zeros(layers, heads, capacity, device=device),
            columns=torch.arange(capacity, device=device), first_slot=scalar(), first_position=scalar(),
            last_row=scalar(),
        )

    def _input(self, n: int) -> torch.Tensor:
        b = self.buffers
        if n not in b.ids:
            b.ids[n] = torch.zeros(1, n, dtype=torch.long, device=b.columns.device)
        return b.ids[n]

    def _run(self, key: tuple, count: int) -> torch.Tensor:
        """The forward `key` (kind, padded length, ...) of which the first `count` rows are real."""
        b = self.buffers
        b.first_slot.fill_(self.slot)
        b.first_position.fill_(self.position)
        b.last_row.fill_(count - 1)
        self.slot += count
        self.position += count
        if self.cuda_graphs:
            logits = graphed(b.graphs, key, lambda: self._forward(*key), self.runner.device)
            if logits is not None:
                return logits
            self.cuda_graphs = False
        return self._forward(*key)

    def _forward(self, kind: str, n: int, rows: int = 1, from_layer: int = 0) -> torch.Tensor:
        """Float32 logits [rows, vocab] of the last `rows` real tokens.

        kind "forward": the n ids; "probe": the same, also recording attention and layer inputs;
        "rerun": layers from `from_layer` up, on the stored layer input, under visible_keys."""
        runner, b = self.runner, self.buffers
        language_model = runner.language_model
        offsets = b.columns[:n]
        slots = b.first_slot + offsets
        position_ids = (b.first_position + offsets).view(1, 1, n).expand(3, 1, n)
        hidden = b.layer_inputs[n][from_layer] if kind == "rerun" else language_model.embed_tokens(b.ids[n])
        rotary = language_model.rotary_emb(hidden, position_ids)
        later = (b.columns >= b.context_slots) & (b.columns <= slots[:, None])  # [n, capacity]
        writer = SlotWriter(b, slots)
        extra = {}
        if kind == "probe":
            real_rows = (offsets <= b.last_row).float()[None, :, None]  # pads must not add attention

            def record(layer: int, probs: torch.Tensor) -> None:  # probs [kv_heads, groups, n, capacity]
                b.attention[layer].copy_((probs.mean(dim=1) * real_rows).sum(dim=1))

            extra = dict(attention_recorder=record)
        for layer in range(from_layer, runner.num_layers):
            if kind == "probe":
                b.layer_inputs[n][layer].copy_(hidden)
            visible = b.visible_keys[layer][:, None, :] | later  # [kv_heads, n, capacity]
            hidden = run_layer(language_model.layers[layer], hidden, writer, attention_mask=visible,
                               position_embeddings=rotary, **extra)
        last = b.last_row - (rows - 1) + offsets[:rows]
        return runner.logits(hidden.index_select(1, last))[0]


def graphed(graphs: dict, key, forward: Callable[[], torch.Tensor], device) -> torch.Tensor | None:
    """forward()'s output, by replaying its CUDA graph (recorded into graphs[key] on first use, after one
    eager run: lazy initialisations, kernel choices); None if it cannot be recorded (an op that cannot be
    captured: the caller stays correct, only slower, by running eagerly from then on)."""
    if key not in graphs:
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # the warm-up writes what the replay will write
                forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = forward()
            graphs[key] = graph, output
        except RuntimeError as exc:
            log.warning("recording a CUDA graph failed (%s); using eager forwards from now on", exc)
            return None
    graph, output = graphs[key]
    graph.replay()
    return output


def _last(rows: int, end: int) -> list[int]:
    """The `rows` row indices before `end`."""
    return list(range(end - rows, end))


def _round_up(tokens: float) -> int:
    return max(1, math.ceil(tokens / SLOT_ROUND)) * SLOT_ROUND


def greedy_tokens(decoder: "EagerDecoder | StaticDecoder", context: Context, next_position: int, ids: list[int],
                  count: int, stop_ids: set[int], lookup: list[int]) -> tuple[list[int], int]:
    """The `count` greedy tokens after `ids` (fewer if one of `stop_ids` comes first; it is left out), exactly as
    one step at a time would choose them, and how many of them were drafted.

    Drafts (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's last
    few tokens in `lookup` + the sequence, e.g. the same probe's answer at the previous chunk. One forward checks
    a whole draft and keeps it up to the first token the model would not have chosen, plus the model's own
    choice there. A forward of a few tokens costs about one step where reading the weights bounds it (a GPU,
    or a CPU at small batch), so every drafted token that holds saves a step.
    """
    if count < 1:
        return [], 0
    decoder.begin(context, next_position, len(ids) + count + 1)
    draft = propose(lookup, ids, count)
    logits = decoder.extend(ids + draft, rows=len(draft) + 1)
    answer, drafted = [], 0
    while True:
        chosen = logits.argmax(dim=-1).tolist()  # chosen[i]: the greedy token after draft[:i]
        held = 0
        while held < len(draft) and chosen[held] == draft[held] and draft[held] not in stop_ids:
            held += 1
        decoder.back(len(draft) - held)
        answer += draft[:held]
        drafted += held
        if len(answer) == count or chosen[held] in stop_ids:
            return answer, drafted
        answer.append(chosen[held])
        if len(answer) == count:
            return answer, drafted
        draft = propose(lookup, ids + answer, count - len(answer))
        logits = decoder.extend([answer[-1]] + draft, rows=len(draft) + 1)


def propose(lookup: list[int], sequence: list[int], limit: int, longest: int = 3) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the sequence's last n tokens in
    lookup + sequence, n from `longest` down to 1; none if there is no such occurrence."""
    haystack = lookup + sequence
    for n in range(min(longest, len(sequence)), 0, -1):
        tail = haystack[-n:]
        for start in range(len(haystack) - n - 1, -1, -1):
            if haystack[start:start + n] == tail:
                return haystack[start + n:start + n + limit]
    return []
