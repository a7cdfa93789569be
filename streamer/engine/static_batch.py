"""Answers of many sessions stepped together over fixed buffers: one CUDA graph per batch size.

Packed steps (streamer.engine.generation) read the weights once for every answer in flight, but an eager
step of a 7B model on a GPU spends most of its time launching kernels (docs/DESIGN.md section 8), whatever
the batch. A CUDA graph launches a recorded step at once, but every tensor it touches must keep its address
and shape, while each session's memory has its own length in each layer. So a StaticBatch holds seats, rows
of fixed buffers:
- seat s holds one answer's context in slots [0, M_l) of layer l (its memory's length there), unused slots
  up to `context_slots`, then the question and the answer from there on (`cursor[s]`: its next slot);
  `context_visible[l, s]` marks [0, M_l);
- the answers in flight hold seats [0, A). A step runs the forward of the smallest bucket B >= A
  (BUCKETS), one token per seat: each writes its key at its own cursor and attends to its seat's context
  and its own question and answer so far (a [B, kv_heads, 1, capacity] mask), which is what it reads
  alone. Seats that do not step this time, and those past A, compute rows nobody reads; their cursor does
  not move, so what they write there is written again before it is read;
- an answer that ends frees its seat, and the last seat's answer moves into it (one seat's copy), so the
  seats in flight stay [0, A) and the smallest bucket fits;
- a question's own tokens (its first step) run eagerly into its seat at their exact length.
Buffers grow (more seats, longer contexts, more answer room) by copying the seats in flight into larger
ones; that drops the recorded graphs. Without graphs (CPU) the same forwards run eagerly: the tests check
that path against packed steps.
"""

from __future__ import annotations

import logging

import torch

from streamer.engine.attention import run_layer
from streamer.engine.decode import CONTEXT_GROWTH, Context, _round_up, graphed
from streamer.engine.text_model import TextModel

log = logging.getLogger("streamer")

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes with a graph each; the largest is the most seats


class SeatsTaken(RuntimeError):
    """No seat for another answer: all BUCKETS[-1] are taken, or the device has no memory for larger buffers."""


class Seat:
    """An answer's row in a StaticBatch; `index` changes when another answer's leaving moves this one."""

    def __init__(self, batch: "StaticBatch", index: int):
        self.batch, self.index = batch, index

    def release(self) -> None:
        """Free the seat (once; later calls do nothing)."""
        if self.batch is not None:
            self.batch._release(self)
            self.batch = None


class SeatWriter:
    """The cache the attention modules call. A question (`seat` given): its n tokens go to that seat at
    slots[0..n). A step: row i's one token goes to seat i at slots[i]."""

    def __init__(self, batch: "StaticBatch", slots: torch.Tensor, seat: int | None = None):
        self.batch, self.slots, self.seat = batch, slots, seat

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        b = self.batch
        if self.seat is not None:
            seat = slice(self.seat, self.seat + 1)
            b.keys[layer_idx][seat].index_copy_(2, self.slots, keys)
            b.values[layer_idx][seat].index_copy_(2, self.slots, values)
            return b.keys[layer_idx][seat], b.values[layer_idx][seat]
        rows = self.slots.shape[0]
        b.keys[layer_idx][b.rows[:rows], :, self.slots] = keys[:, :, 0]
        b.values[layer_idx][b.rows[:rows], :, self.slots] = values[:, :, 0]
        return b.keys[layer_idx][:rows], b.values[layer_idx][:rows]


class StaticBatch:
    def __init__(self, runner: TextModel, cuda_graphs: bool = True):
        self.runner = runner
        self.cuda_graphs = cuda_graphs and runner.device.type == "cuda"
        self.seated: list[Seat] = []
        self.seats = self.context_slots = self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer [seats, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._free_state()

    def _free_state(self) -> None:
        """The per-seat state tensors _reserve allocates with the buffers."""
        self.context_visible = self.cursor = self.position = self.ids = self.rows = self.columns = None

    def full(self) -> bool:
        return len(self.seated) >= BUCKETS[-1]

    def trim(self) -> bool:
        """Free the buffers and graphs while no answer holds a seat (they grow to the largest burst of answers:
        on a 7B up to ~0.9 GB a seat, room the sessions' memories need); the next answer allocates again.
        Returns whether anything was freed."""
        if self.seated or not self.seats:
            return False
        log.info("static batch: %d idle seats freed", self.seats)
        self.keys, self.values, self.graphs = [], [], {}
        self.seats = self.context_slots = self.capacity = 0
        self._free_state()
        return True

    # --- the answers' side ----------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, context: Context, next_position: int, ids: list[int], max_new_tokens: int
              ) -> tuple[Seat, torch.Tensor]:
        """Seat an answer: copy its context in and run its question (text positions from next_position on);
        returns its seat and the float32 logits after the question's last token."""
        if self.full():
            raise SeatsTaken(f"every one of the {BUCKETS[-1]} seats is taken")
        lengths = [keys.shape[2] for keys, _ in context]
        try:
            self._reserve(len(self.seated) + 1, max(lengths), len(ids) + max_new_tokens)
        except torch.OutOfMemoryError as exc:
            raise SeatsTaken(f"no device memory for larger seat buffers ({exc})") from None
        seat = Seat(self, len(self.seated))
        self.seated.append(seat)
        s = seat.index
        for layer, (keys, values) in enumerate(context):
            self.keys[layer][s, :, :lengths[layer]].copy_(keys[0])
            self.values[layer][s, :, :lengths[layer]].copy_(values[0])
        limits = torch.tensor(lengths, device=self.columns.device)[:, None]
        self.context_visible[:, s] = (self.columns < limits)[:, None, :]
        self.cursor[s], self.position[s] = self.context_slots, next_position
        try:
            return seat, self._question(s, ids)
        except BaseException:  # the executor fails this answer; its seat must not stay taken
            seat.release()
            raise

    @torch.inference_mode()
    def step(self, tokens: list[tuple[Seat, int]]) -> list[torch.Tensor]:
        """One token for each (seat, token) given, in one forward over the seats in flight; returns the float32
        logits after each, in the order given."""
        seats = torch.tensor([seat.index for seat, _ in tokens], device=self.columns.device)
        self.ids[seats] = torch.tensor([token for _, token in tokens], device=self.columns.device)
        bucket = next(b for b in BUCKETS if b >= len(self.seated))
        logits = self._run(bucket)[seats].clone()
        self.cursor[seats] += 1
        self.position[seats] += 1
        return list(logits)

    @torch.inference_mode()  # its buffers are inference tensors; an executor releases from outside a step
    def _release(self, seat: Seat) -> None:
        last = self.seated.pop()
        if last is not seat:  # the last seat's answer moves into the freed one
            s, t = seat.index, last.index
            for layer in range(len(self.keys)):
                self.keys[layer][s].copy_(self.keys[layer][t])
                self.values[layer][s].copy_(self.values[layer][t])
            self.context_visible[:, s] = self.context_visible[:, t]
            self.cursor[s], self.position[s] = self.cursor[t], self.position[t]
            last.index = s
            self.seated[s] = last
        self.cursor[len(self.seated)] = self.context_slots  # a free seat writes inside its buffer

    # --- buffers and graphs ---------------------------------------------------------------

    def _reserve(self, seats: int, context_tokens: int, answer_slots: int) -> None:
        """Buffers for `seats` seats of `context_tokens` per layer and `answer_slots` after them; growing
        copies the seats in flight (their answers' slots move with the context's end)."""
        if seats <= self.seats and context_tokens <= self.context_slots and \
                answer_slots <= self.capacity - self.context_slots:
            return
        runner = self.runner
        device, dtype, layers, heads = runner.device, runner.model.dtype, runner.num_layers, runner.kv_heads
        new_seats = next(b for b in BUCKETS if b >= max(seats, self.seats))
        context_slots = max(self.context_slots, _round_up(CONTEXT_GROWTH * context_tokens))
        answer = max(self.capacity - self.context_slots, _round_up(answer_slots))
        capacity = context_slots + answer
        log.info("static batch buffers: %d seats of %d context + %d answer slots per layer", new_seats,
                 context_slots, answer)
        # everything new is allocated before anything changes: out of memory leaves the batch as it was
        keys = [torch.zeros(new_seats, heads, capacity, runner.head_dim, device=device, dtype=dtype)
                for _ in range(layers)]
        values = [torch.zeros_like(layer) for layer in keys]
        visible = torch.zeros(layers, new_seats, heads, capacity, dtype=torch.bool, device=device)
        shift = context_slots - self.context_slots
        count, old, answered = len(self.seated), self.context_slots, self.capacity - self.context_slots
        for new, was in zip(keys + values, self.keys + self.values):
            new[:count, :, :old] = was[:count, :, :old]
            new[:count, :, context_slots:context_slots + answered] = was[:count, :, old:]
        self.graphs = {}  # recorded on the old buffers
        self.keys, self.values = keys, values
        cursor = torch.full((new_seats,), context_slots, dtype=torch.long, device=device)
        position = torch.zeros(new_seats, dtype=torch.long, device=device)
        if count:
            visible[:, :count, :, :old] = self.context_visible[:, :count, :, :old]
            cursor[:count] = self.cursor[:count] + shift
            position[:count] = self.position[:count]
        self.context_visible, self.cursor, self.position = visible, cursor, position
        self.ids = torch.zeros(new_seats, dtype=torch.long, device=device)
        self.rows = torch.arange(new_seats, device=device)
        self.columns = torch.arange(capacity, device=device)
        self.seats, self.context_slots, self.capacity = new_seats, context_slots, capacity

    def _question(self, seat: int, ids: list[int]) -> torch.Tensor:
        """A question's tokens into its seat, eagerly; the logits after the last."""
        runner = self.runner
        language_model = runner.language_model
        n = len(ids)
        slots = self.cursor[seat] + self.columns[:n]
        position_ids = (self.position[seat] + self.columns[:n]).view(1, 1, n).expand(3, 1, n)
        hidden = language_model.embed_tokens(torch.tensor([ids], device=self.columns.device))
        rotary = language_model.rotary_emb(hidden, position_ids)
        later = (self.columns >= self.context_slots) & (self.columns <= slots[:, None])  # [n, capacity]
        writer = SeatWriter(self, slots, seat)
        for layer in range(runner.num_layers):
            visible = self.context_visible[layer, seat][:, None, :] | later  # [kv_heads, n, capacity]
            hidden = run_layer(language_model.layers[layer], hidden, writer, attention_mask=visible,
                               position_embeddings=rotary)
        self.cursor[seat] += n
        self.position[seat] += n
        return runner.logits(hidden[:, -1:])[0, 0]

    def _run(self, bucket: int) -> torch.Tensor:
        if self.cuda_graphs:  # the recording's warm-up writes only at the cursors, which the replay writes again
            logits = graphed(self.graphs, bucket, lambda: self._forward(bucket), self.runner.device)
            if logits is not None:
                return logits
            self.cuda_graphs = False
        return self._forward(bucket)

    def _forward(self, bucket: int) -> torch.Tensor:
        """Float32 logits [bucket, vocab]: one token per seat in [0, bucket), each at its cursor."""
        runner = self.runner
        language_model = runner.language_model
        cursor = self.cursor[:bucket]
        position_ids = self.position[:bucket].view(1, bucket, 1).expand(3, bucket, 1)
        hidden = language_model.embed_tokens(self.ids[:bucket, None])
        rotary = language_model.rotary_emb(hidden, position_ids)
        later = (self.columns >= self.context_slots) & (self.columns <= cursor[:, None])  # [bucket, capacity]
        writer = SeatWriter(self, cursor)
        for layer in range(runner.num_layers):
            visible = (self.context_visible[layer, :bucket] | later[:, None, :])[:, :, None, :]
            hidden = run_layer(language_model.layers[layer], hidden, writer, attention_mask=visible,
                               position_embeddings=rotary)
        return runner.logits(hidden)[:, 0]

