"""Answers generated a step at a time, for one session or many at once.

A Generation is one answer in progress: a question's tokens go in at its first step, one answer
token at each later step. `advance(runner, generations)` runs one step of every generation given
in ONE forward: their inputs packed into one sequence [1, T, hidden], so every weight matrix is
read once per step for all of them. Decoding is bound by reading the weights (on a GPU, and on a
CPU for a 2B model), so a step for 32 answers costs about what a step for one does.

Attention cannot be packed that way: each generation attends to its own memory, whose length
differs per layer and per session. Each generation's step is a segment of a packed forward
(streamer.engine.packed), whose attention is the call the generation makes alone, on the same keys.
A generation's tokens and logits are therefore the ones it gets alone, up to the rounding of matrix
products over more rows (float32: ~1e-7). A generation alone takes the same path with one segment,
so `Runner.answer`, the evaluations and the service all generate through this file.

A generation given a StaticDecoder (CUDA graphs, streamer.engine.decode) steps alone: its buffers
are shared by every user of that decoder, so it is for answers run one at a time (`streamer ask`,
the evaluations), never for the service's batches. Those, on a GPU, take seats of the runner's
StaticBatch (streamer.engine.static_batch): the same step over fixed per-seat buffers, replayed as one
CUDA graph per batch size; with every seat taken, an answer takes the packed steps instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from streamer.engine.decode import Context, StaticDecoder
from streamer.engine.packed import Segment, run_segments
from streamer.engine.positions import text_positions
from streamer.engine.static_batch import Seat, SeatsTaken, StaticBatch
from streamer.engine.text_model import TextModel
from streamer.engine.view import MemoryView

TOP_LOGPROBS = 5


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    first_token_logprobs: list[dict]  # top-5 of the first answer step: {"token", "id", "logprob"}
    timings: dict = field(default_factory=dict)
    first_logits: torch.Tensor | None = None  # float32 [vocab] of the first step: what memory fidelity compares


@dataclass
class Generation:
    """One answer in progress (made by Runner.begin, stepped by advance)."""

    position: int  # the text position of the next input
    inputs: list[int]  # what the next step feeds: the question's tokens, then the last answer token
    max_new_tokens: int
    stop_at_end: bool  # False: exactly max_new_tokens tokens (timing decode steps)
    seen: set[int]  # the token ids the repetition penalty counts: the prompt's, then the answer's
    view: MemoryView | None = None  # the memory plus room for the question and answer (packed steps)
    static: StaticDecoder | None = None  # or a CUDA-graph decoder (steps alone)
    batch: StaticBatch | None = None  # or seats stepped together under CUDA graphs (seated at the first step)
    seat: Seat | None = None
    context: Context | None = None  # what `static` is loaded with, or `batch` seats, at the first step
    on_text: Callable[[str], None] | None = None  # the answer's text, piece by piece (whole characters)
    tokens: list[int] = field(default_factory=list)
    first_token_logprobs: list[dict] = field(default_factory=list)
    first_logits: torch.Tensor | None = None
    sent: str = ""  # the text given to on_text so far
    decode_steps: int = 0  # steps after the first
    done: bool = False
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def size(self) -> int:
        """Tokens this generation's next step feeds."""
        return len(self.inputs)

    def answer(self, tokenizer) -> Answer:
        """The finished answer; timings: question_prefill from Runner.begin (recall included) to the first token
        (in a batch: the wait for the step included), decode from there to the end."""
        ttft = self.first_token_at - self.created
        decode = self.finished_at - self.first_token_at
        rate = self.decode_steps / decode if self.decode_steps and decode > 0 else None
        return Answer(text=tokenizer.decode(self.tokens, skip_special_tokens=True), token_ids=self.tokens,
                      first_token_logprobs=self.first_token_logprobs, first_logits=self.first_logits,
                      timings=dict(question_prefill=ttft, decode=decode, decode_tokens_per_s=rate))

    def _take(self, runner: TextModel, logits: torch.Tensor) -> None:
        """The logits after this step's inputs: choose the next token, or finish."""
        if self.first_logits is None:
            self.first_token_at = time.perf_counter()
            self.first_logits = logits
            top = torch.log_softmax(logits, dim=-1).topk(TOP_LOGPROBS)
            self.first_token_logprobs = [dict(token=runner.tokenizer.decode([i]), id=i, logprob=lp)
                                         for lp, i in zip(top.values.tolist(), top.indices.tolist())]
        else:
            self.decode_steps += 1
        self.position += len(self.inputs)
        token = runner.choose(logits, self.seen)
        if self.stop_at_end and token in runner.stop_ids:
            return self._finish(runner)
        self.tokens.append(token)
        self.seen.add(token)
        self._stream(runner.tokenizer)
        if len(self.tokens) == self.max_new_tokens:
            return self._finish(runner)
        self.inputs = [token]

    def _stream(self, tokenizer, final: bool = False) -> None:
        if self.on_text is None:
            return
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.sent) and (final or not text.endswith("\ufffd")):  # a token may end mid-character
            self.on_text(text[len(self.sent):])
            self.sent = text

    def _finish(self, runner: TextModel) -> None:
        self._stream(runner.tokenizer, final=True)
        self.done = True
        self.finished_at = time.perf_counter()
        self.release()

    def release(self) -> None:
        """Let go of the copy of the memory (and the seat) as soon as the answer is done or abandoned."""
        if self.seat is not None:
            self.seat.release()
        self.view = self.context = self.seat = self.batch = None


@torch.inference_mode()
def advance(runner: TextModel, generations: list[Generation]) -> None:
    """One step of every unfinished generation: their inputs in one forward (those with a static decoder
    one by one), each taking its logits. Generations that finish are marked done."""
    live = [g for g in generations if not g.done]
    for g in (g for g in live if g.static is not None):
        if g.first_logits is None:
            logits = g.static.start(g.context, g.position, g.inputs, g.max_new_tokens)
        else:
            logits = g.static.step(g.inputs[0])
        g._take(runner, logits)
    _seated(runner, [g for g in live if g.batch is not None])
    packed = [g for g in live if g.static is None and g.batch is None and not g.done]
    if not packed:
        return
    segments = [Segment(g.view, text_positions(g.position, g.size), ids=g.inputs, rows=[g.size - 1]) for g in packed]
    for g, logits in zip(packed, run_segments(runner, segments)):
        g._take(runner, logits[0])


def _seated(runner: TextModel, generations: list[Generation]) -> None:
    """The step of the generations that use static seats: those seated already in one forward, each new one
    seated with its question (or, with every seat taken, sent to the packed steps)."""
    stepping = [g for g in generations if g.seat is not None]
    new = [g for g in generations if g.seat is None]
    if stepping:
        logits = stepping[0].batch.step([(g.seat, g.inputs[0]) for g in stepping])
        for g, row in zip(stepping, logits):
            g._take(runner, row)
    for g in new:
        try:
            g.seat, logits = g.batch.admit(g.context, g.position, g.inputs, g.max_new_tokens)
        except SeatsTaken:  # every seat taken, or no memory for more: packed steps (the batch is as it was)
            g.batch, g.view = None, MemoryView(g.context, extra=g.size + g.max_new_tokens)
            continue
        g.context = None
        g._take(runner, logits)
