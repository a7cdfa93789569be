"""One client's stream on the server: its memory, its pending frames, its questions.

Frames arrive one by one (pushed images, or a server-side reader). Once `chunk_frames` are
pending a chunk is queued for the model; a session keeps at most `max_queued_chunks` chunks
queued so that it never floods the shared model. Frames wait at model resolution, at most four
chunks' worth and `max_pending_bytes`; beyond that they are dropped or thinned (live sources) or
make the reader wait (files). A question sees every frame received before it: the memory, and the
frames not in it yet (queued or pending) as the stream's last chunk in a copy of it
(streamer.engine.stream.with_newest), unless those are more than a chunk: then ingestion is
behind, and it answers from the memory alone at once (saying how many frames it did not see).
All model work goes through the shared ModelExecutor; everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from memory.snapshot import load_memory, save_memory
from memory.store import ChunkRecord, chunk_stretches, coverage
from streamer.config import Config
from streamer.engine.runner import CHUNK_STAGES, DEFAULT_FPS, PositionLimitError, Runner
from streamer.engine.stream import with_newest
from streamer.service.metrics import Metrics
from streamer.service.protocol import ProtocolError, ServerLimits
from streamer.service.executor import ASK, ModelExecutor
from video_io.errors import VideoError
from video_io.frames import Frame
from video_io.preprocess import resize_frames

log = logging.getLogger("streamer")
session_ids = itertools.count(1)


TIMELINE_STRETCHES = 48


def timeline(memory) -> list[dict]:
    """What the memory holds of each of (at most) 48 stretches of the stream, a chunk or more each."""
    return coverage(memory, chunk_stretches(memory, TIMELINE_STRETCHES))


@dataclass
class Shared:
    """What all sessions share: the model, its executor, the limits, the metrics, the model's identity."""

    runner: Runner
    executor: ModelExecutor
    metrics: Metrics
    limits: ServerLimits
    defaults: Config
    model_name: str
    identity: dict = field(default_factory=dict)
    name: str = ""  # prefixes session ids: replicas of one service give distinct ids


class StreamSession:
    def __init__(self, shared: Shared, config: Config, send: Callable[[dict], None]):
        self.id = f"{shared.name}s{next(session_ids)}"
        self.key = secrets.token_urlsafe(16)  # its owner may hand it on: a chat request asks this memory with it
        self.shared = shared
        self.config = config
        self.send = send
        self.runner = shared.runner
        self.policy = config.make_policy()
        self.preset = config.vision_preset(shared.runner.preset)
        self.memory = self.runner.new_memory(**config.memory.limits())
        # what the memory holds of each stretch of the stream, computed on the model thread after each change:
        # stats (on the event loop) must not read a memory that a chunk is being committed into
        self.coverage: list[dict] = []
        self.timeline: list[dict] = []  # the same in stretches of whole chunks, for the page's timeline
        self.last_ts: float | None = None  # the newest frame's time (seconds)
        self.ingested_ts: float | None = None  # the newest ingested frame's time
        # the rate of the frames ingested: the start option (or config), or the source a server-side ingest reads
        self.fps = config.video.fps
        self.chunk_frames = config.memory.chunk_frames
        limits = shared.limits
        # room for at least one chunk, or a waiting file reader could never complete one
        self.max_pending = max(limits.max_pending_frames or 4 * self.chunk_frames, self.chunk_frames)
        self.pending: list[Frame] = []
        self.queued: list[Frame] = []  # the frames of the chunks queued for the model, in stream order
        self.ingested_through = -1  # index of the last frame a chunk job has taken (set on the model thread)
        self.frame_shape: tuple[int, ...] | None = None
        self.received = self.dropped = self.queued_chunks = self.answered = 0
        self.flushing = False
        self.closed = False
        self.tasks: set[asyncio.Task] = set()
        self.answering: dict[asyncio.Task, Any] = {}  # the questions being answered, by their ids
        self.room = asyncio.Condition()  # signalled when pending frames leave, for readers that wait
        self.reader: threading.Thread | None = None
        self.reader_stop = threading.Event()

    # --- frames in --------------------------------------------------------------------------

    def model_frame(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """(the frame resized to the model's resolution now, its size as sent). Called off the event loop:
        waiting frames are held at model resolution (a 4K frame would hold ~25 MB, at 144 tokens ~0.3 MB),
        and ingesting them gives exactly what the full-size frames would (video_io.preprocess.resize_frames)."""
        return resize_frames([image], self.preset)[0], image.shape

    async def add_frame(self, image: np.ndarray, source_shape: tuple[int, ...], ts: float | None,
                        wait: bool = False) -> None:
        """Take one frame from model_frame. wait=True (file readers) waits for room instead of dropping."""
        if self.closed:
            raise ProtocolError("session_closed", "the session is closed")
        if self.received >= self.shared.limits.max_frames_per_session:
            raise ProtocolError("frame_limit", f"this session reached its limit of "
                                f"{self.shared.limits.max_frames_per_session} frames; start a new session")
        if self.frame_shape is None:
            fit = self.shared.limits.max_pending_bytes // image.nbytes  # frames of this size within the limit
            if fit < self.chunk_frames:
                raise ProtocolError("bad_option", f"a chunk of {self.chunk_frames} frames of {image.shape[1]}x"
                                    f"{image.shape[0]} would hold {self.chunk_frames * image.nbytes >> 20} MB, over "
                                    f"this server's {self.shared.limits.max_pending_bytes >> 20} MB of waiting "
                                    "frames per session; lower chunk_frames or max_pixels")
            self.max_pending = min(self.max_pending, fit)
            self.frame_shape = source_shape
        elif source_shape != self.frame_shape:
            raise ProtocolError("frame_size_changed", f"frame of {source_shape[1]}x{source_shape[0]} after frames "
                                f"of {self.frame_shape[1]}x{self.frame_shape[0]}; every frame of a stream must have "
                                "the same size")
        if wait:
            async with self.room:
                await self.room.wait_for(lambda: len(self.pending) < self.max_pending or self.closed)
        elif len(self.pending) >= self.max_pending:
            self._overflow()
        if ts is None:  # the stream's time goes on at its rate from the last frame's, taken into a chunk or not
            ts = 0.0 if self.last_ts is None else self.last_ts + 1 / (self.fps or DEFAULT_FPS)
        self.last_ts = float(ts)
        self.pending.append(Frame(image=image, ts=self.last_ts, index=self.received))
        self.received += 1
        self._schedule_chunks()

    def _overflow(self) -> None:
        """Ingestion is behind a live source: thin the pending frames or drop the oldest."""
        before = len(self.pending)
        if self.shared.limits.overflow == "subsample":
            self.pending = self.pending[1::2]  # every other frame: the stream keeps its whole span
        else:
            self.pending = self.pending[before - self.max_pending + 1:]
        dropped = before - len(self.pending)
        self.dropped += dropped
        self.shared.metrics.frames_dropped.inc(dropped)
        self.send(dict(type="warning", code="frames_dropped", dropped=dropped, total_dropped=self.dropped,
                       message=f"frames arrive faster than they are ingested: {self.shared.limits.overflow} "
                               f"dropped {dropped} pending frames; send fewer frames per second"))

    def flush(self) -> None:
        """Ingest every pending frame now, even if that makes a short chunk."""
        self.flushing = True
        self._schedule_chunks()

    def _schedule_chunks(self) -> None:
        while self.queued_chunks < self.shared.limits.max_queued_chunks and (
                len(self.pending) >= self.chunk_frames or (self.flushing and self.pending)):
            frames, self.pending = self.pending[:self.chunk_frames], self.pending[self.chunk_frames:]
            self.queued_chunks += 1
            self.queued += frames
            self._spawn(self._ingest(frames))
        if not self.pending:
            self.flushing = False

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _ingest(self, frames: list[Frame]) -> None:
        try:
            async with self.room:
                self.room.notify_all()
            record = await self.shared.executor.ingest(self.id, self._ingest_now, frames)
            seconds = sum(record.timings[stage] for stage in CHUNK_STAGES) - record.timings.get("waited", 0.0)
            self.ingested_ts = frames[-1].ts
            self.shared.metrics.chunk_seconds.observe(seconds)
            self.shared.metrics.frames_ingested.inc(len(frames))
            self.send(dict(type="progress", frames=self.memory.frames, chunks=self.memory.chunk_count,
                           chunk_frames=len(frames), until_ts=frames[-1].ts, pending=len(self.pending),
                           memory_tokens=self.memory.mean_tokens(), full_tokens=self.memory.full_tokens,
                           ratios=record.ratios, js=record.js, evicted=sum(record.evicted),
                           seconds=seconds))
        except asyncio.CancelledError:
            raise
        except PositionLimitError as exc:  # the stream is full; the memory stays and answers
            self.send(dict(type="error", code="position_limit", message=str(exc)))
        except Exception as exc:
            log.exception("session %s: ingest failed", self.id)
            self.send(dict(type="error", code="ingest_failed", message=f"a chunk of {len(frames)} frames could not "
                                                                         f"be ingested: {exc}"))
        finally:
            self.queued_chunks -= 1
            self.queued = [f for f in self.queued if f.index > frames[-1].index]
            if not self.closed:
                self._schedule_chunks()
            async with self.room:  # wakes a reader waiting for room, and an ingest_done waiting for the chunks
                self.room.notify_all()

    def _ingest_now(self, frames: list[Frame]) -> ChunkRecord:  # on the model thread
        try:
            record = self.runner.ingest(self.memory, [f.image for f in frames], self.policy, self.preset, self.fps)
            self.coverage, self.timeline = coverage(self.memory), timeline(self.memory)
            return record
        finally:  # taken, in or (failed) never: a question from now on leaves these frames to the memory
            self.ingested_through = frames[-1].index

    # --- server-side reading ---------------------------------------------------------------

    def start_reader(self, open_source: Callable[[], Iterator[Frame]], live: bool, label: str) -> None:
        """Read frames from a file or stream on a thread; files wait for room, live sources may drop."""
        if self.reader is not None and self.reader.is_alive():
            raise ProtocolError("ingest_running", "this session is already reading a source; wait for ingest_done")
        loop = asyncio.get_running_loop()

        def read() -> None:
            count, error = 0, None
            try:
                for frame in open_source():
                    if self.reader_stop.is_set():
                        break
                    image, shape = self.model_frame(frame.image)
                    asyncio.run_coroutine_threadsafe(self.add_frame(image, shape, frame.ts, wait=not live),
                                                     loop).result()
                    count += 1
            except ProtocolError as exc:
                error = (exc.code, str(exc))
            except VideoError as exc:
                error = ("bad_video", str(exc))
            except Exception as exc:  # a reader must never take the server down
                log.exception("session %s: reading %s failed", self.id, label)
                error = ("bad_video", f"reading {label} failed: {exc}")
            if not self.reader_stop.is_set():
                loop.call_soon_threadsafe(self._reader_done, label, count, error)

        self.reader_stop.clear()
        self.reader = threading.Thread(target=read, name=f"reader-{self.id}", daemon=True)
        self.reader.start()

    def _reader_done(self, label: str, count: int, error: tuple[str, str] | None) -> None:
        if error is not None:
            self.send(dict(type="error", code=error[0], message=error[1], source=label))
        if self.closed:
            return
        self.flush()
        self._spawn(self._announce_ingested(label, count))

    async def _announce_ingested(self, label: str, count: int) -> None:
        """ingest_done once the source's frames are in the memory, not merely read: a question after it sees them."""
        async with self.room:
            await self.room.wait_for(lambda: self.closed or (self.queued_chunks == 0 and not self.pending))
        if not self.closed:
            self.send(dict(type="ingest_done", source=label, frames_read=count, frames=self.received,
                           frames_ingested=self.memory.frames))

    # --- questions out ---------------------------------------------------------------------

    async def ask(self, question_id: Any, question: str, max_new_tokens: int, ignore_eos: bool = False,
                  send: Callable[[dict], None] | None = None) -> None:
        """Answer in the background; its tokens and answer go to `send` (default: the session's connection)."""
        waiting = self.queued + self.pending  # what it sees beyond the memory: every frame received by now
        if self.memory.video_start is None and not waiting:
            raise ProtocolError("no_video", "the memory holds no video yet: send frames or an ingest message first")
        if self.questions >= self.shared.limits.max_questions:
            raise ProtocolError("too_many_questions", f"{self.questions} questions are already waiting for answers "
                                "in this session; wait for one to finish")
        task = self._spawn(self._answer(question_id, question, max_new_tokens, waiting, ignore_eos, send or self.send))
        self.answering[task] = question_id
        task.add_done_callback(self.answering.pop)  # even a task cancelled before it ran

    @property
    def questions(self) -> int:
        """Questions being answered (or waiting for the model)."""
        return len(self.answering)

    def cancel(self, question_id: Any) -> None:
        """Stop answering the question(s) with this id: they leave the batch at the next step and get an answer
        with `cancelled` and the text so far."""
        tasks = [task for task, answering in self.answering.items() if answering == question_id]
        if question_id is None or not tasks:
            raise ProtocolError("not_answering", f"no question with id {question_id!r} is being answered "
                                "(it may have finished)")
        for task in tasks:
            task.cancel()

    async def _answer(self, question_id: Any, question: str, max_new_tokens: int, waiting: list[Frame],
                      ignore_eos: bool, send: Callable[[dict], None]) -> None:
        loop = asyncio.get_running_loop()
        streamed: list[str] = []
        finished = False  # set before this coroutine yields for the last time: later tokens are dropped

        def deliver(text: str) -> None:  # on the event loop: nothing after the answer (a cancelled one's step)
            if not finished:
                streamed.append(text)
                send(dict(type="token", id=question_id, text=text))

        def on_text(text: str) -> None:  # called on the model thread
            loop.call_soon_threadsafe(deliver, text)

        def setup():  # on the model thread: the chunks that ran before it are in the memory, the rest is not
            newest = [f for f in waiting if f.index > self.ingested_through]
            # ingestion behind by more than a chunk: answer now from what is in, rather than prefill the backlog
            # twice (here and in its chunks); the reply says how many frames it did not see. With nothing in
            # yet (the stream's first chunks are still queued) there is no such answer: it sees them all
            behind = len(newest) > self.chunk_frames and self.memory.video_start is not None
            seen = [] if behind else newest
            memory = with_newest(self.runner, self.memory, seen, self.policy, self.chunk_frames, self.preset,
                                 self.fps)
            generation = self.runner.begin(memory, question, max_new_tokens, on_text, stop_at_end=not ignore_eos,
                                           packed=True)
            seen_by = dict(memory_tokens=memory.mean_tokens(), full_tokens=memory.full_tokens, frames=memory.frames,
                           frames_behind=len(newest) - len(seen))
            return generation, seen_by  # the generation holds its own copy of the memory, not the fork

        try:
            seen_by, answer = await self.shared.executor.generate(setup)
            timings = answer.timings
            send(dict(type="answer", id=question_id, text=answer.text, stats=dict(
                tokens=len(answer.token_ids), ttft_s=timings["question_prefill"], decode_s=timings["decode"],
                tokens_per_s=timings["decode_tokens_per_s"], **seen_by)))
            self.answered += 1
        except asyncio.CancelledError:
            if self.closed:  # a chat request asking this session's memory hears it; the connection is gone
                send(dict(type="error", code="session_closed", id=question_id, message="the session closed before "
                          "the answer was complete"))
                raise
            send(dict(type="answer", id=question_id, text="".join(streamed), cancelled=True))
        except Exception as exc:
            log.exception("session %s: answering failed", self.id)
            send(dict(type="error", code="answer_failed", id=question_id, message=f"answering failed: {exc}"))
        finally:
            finished = True

    # --- snapshots, stats, close ------------------------------------------------------------

    async def save(self, path: Path) -> dict:
        identity = self.shared.identity
        await self.shared.executor.submit(ASK, save_memory, self.memory, path, identity)
        return dict(type="saved", path=str(path), memory_tokens=self.memory.mean_tokens(), frames=self.memory.frames)

    async def load(self, path: Path) -> dict:
        if self.busy() or self.pending:
            raise ProtocolError("busy", "frames are still being ingested; load a memory into an idle session")
        runner = self.runner
        memory, _ = await self.shared.executor.submit(
            ASK, load_memory, path, self.shared.identity, runner.device, runner.model.dtype)
        # not shared with the model thread yet
        self.coverage, self.timeline = (coverage(memory), timeline(memory)) if memory.chunk_count else ([], [])
        memory.budget = self.memory.budget  # the session's bounds, not the file's
        memory.recall, memory.host_budget = self.memory.recall, self.memory.host_budget
        memory.reset_host()
        self.memory = memory
        self.frame_shape = None  # the saved stream's frames are not known; the next frame sets the size
        return dict(type="loaded", path=str(path), frames=memory.frames, memory_tokens=memory.mean_tokens())

    def busy(self) -> bool:
        """Work in progress for this session: a reader, queued chunks or questions being answered."""
        reading = self.reader is not None and self.reader.is_alive()
        return reading or self.queued_chunks > 0 or self.questions > 0

    def lag(self) -> tuple[int, float]:
        """How far ingestion is behind the stream: frames received and not in the memory (queued or pending),
        and the stream seconds between the newest frame received and the newest in the memory."""
        waiting = self.queued + self.pending
        if self.last_ts is None or not waiting:
            return len(waiting), 0.0
        since = self.ingested_ts if self.ingested_ts is not None else waiting[0].ts
        return len(waiting), max(0.0, self.last_ts - since)

    def stats(self) -> dict:
        memory = self.memory
        last = memory.chunks[-1] if memory.chunks else None
        return dict(type="stats", session=self.id, policy=self.policy.name, frames_received=self.received,
                    frames_ingested=memory.frames, frames_pending=len(self.pending), frames_dropped=self.dropped,
                    chunks=memory.chunk_count, chunks_queued=self.queued_chunks,
                    memory_tokens=memory.mean_tokens(), full_tokens=memory.full_tokens,
                    memory_tokens_per_layer=memory.tokens_per_layer(), budget=memory.budget,
                    evicted_tokens=memory.evicted, host_tokens=sum(len(layer) for layer in memory.host) / len(
                        memory.layers), recall=memory.recall, coverage=self.coverage, timeline=self.timeline,
                    retimed_positions=memory.time_shift,
                    last_ratios=last and last.ratios, last_js=last and last.js,
                    questions_answered=self.answered, questions_waiting=self.questions)

    async def close(self) -> None:
        """Stop reading, drop queued work, free the memory."""
        self.closed = True
        self.reader_stop.set()
        async with self.room:
            self.room.notify_all()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pending = []
        self.memory = None
