"""One model, many sessions: the model thread runs steps, not whole jobs.

Two kinds of work reach the model thread:
- jobs (a chunk to ingest, a question's set-up, a save or load) run from a priority queue: questions'
  work first (ASK), then chunks (INGEST) in submission order, so a session's chunks stay in stream
  order. Each round of the thread runs the question jobs queued when it began (so every question
  that arrived joins the next step together), one step, then the oldest chunk -- together with the
  oldest queued chunk of each other session, up to `max_together` chunks, their probe forwards
  packed across sessions (streamer.engine.together): questions cannot starve ingestion.
- answers being generated (streamer.engine.generation) advance together: one step is one forward
  over the next token of every answer in flight (up to `max_batch`, oldest first) and the tokens of
  questions that have just joined.
Between jobs the thread runs a step; inside a job, after every decoder layer of its forwards
(Runner.between_layers), it runs the questions' jobs that are waiting (nested, without further
interruption) and a step when one is due: when the job has had the thread for as long as the last
step took. So an answer never waits for a whole chunk, a new question starts within one layer's
time, and ingestion keeps about half the thread while answers are generated. A cancelled request
(its session closed or gone) is dropped before its job runs, or leaves the batch at the next step.
The event loop never runs model code; results come back to it with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from streamer.engine.generation import Generation, advance
from streamer.engine.text_model import TextModel
from streamer.engine.together import ingest_together

log = logging.getLogger("streamer")

ASK = 0  # questions first
INGEST = 1
TRIM_AFTER_S = 30.0  # idle this long, the model thread frees the answers' seat buffers (streamer.engine.static_batch)


@dataclass(order=True)
class Job:
    priority: int
    order: int
    fn: Callable = field(compare=False)
    args: tuple = field(compare=False)
    future: asyncio.Future = field(compare=False)
    submitted: float = field(compare=False, default_factory=time.perf_counter)
    admits: bool = field(compare=False, default=False)  # fn returns (Generation, extra): an answer to step
    owner: str | None = field(compare=False, default=None)  # a chunk's session: chunks of different ones go together
    cancelled: bool = field(compare=False, default=False)


@dataclass(eq=False)  # compared by identity: a Generation holds tensors
class Running:
    """An answer in the batch, and what its caller gets when it is done."""

    generation: Generation
    extra: Any
    job: Job
    last_token_at: float | None = None


class ModelExecutor:
    def __init__(self, runner: TextModel, max_batch: int = 32, metrics=None, max_together: int = 8):
        """max_batch: answers stepped together (1: one answer at a time, the unbatched engine). max_together:
        chunks of different sessions ingested together (1: one chunk at a time); each holds a copy of its
        session's memory while it runs. metrics: a streamer.service.metrics.Metrics that records latencies,
        batch sizes and step times."""
        if max_batch < 1 or max_together < 1:
            raise ValueError(f"max_batch and max_together must be >= 1, got {max_batch} and {max_together}")
        self.runner, self.max_batch, self.max_together, self.metrics = runner, max_batch, max_together, metrics
        self.jobs: list[Job] = []
        self.running: list[Running] = []
        self.order = itertools.count()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.inside = False  # in a step or a nested job: no interruption
        self.last_step_s = 0.0
        self.last_step_end = time.perf_counter()

    def start(self) -> None:
        """Start the model thread for the running event loop; once (later calls do nothing)."""
        if self.thread is None:
            self.loop = asyncio.get_running_loop()
            self.runner.between_layers = self._interject
            self.thread = threading.Thread(target=self._run, name="model", daemon=True)
            self.thread.start()

    # --- the event loop's side ----------------------------------------------------------------

    async def submit(self, priority: int, fn: Callable[..., Any], *args) -> Any:
        """fn(*args) on the model thread when its turn comes; cancelling the await drops the job."""
        return await self._queue(Job(priority, next(self.order), fn, args, self.loop.create_future()))

    async def ingest(self, owner: str, fn: Callable[..., Any], *args) -> Any:
        """A chunk of session `owner`: fn(*args) on the model thread in the session's stream order, possibly
        together with other sessions' chunks."""
        return await self._queue(Job(INGEST, next(self.order), fn, args, self.loop.create_future(), owner=owner))

    async def generate(self, setup: Callable[..., tuple[Generation, Any]], *args) -> tuple[Any, Any]:
        """An answer: setup(*args) runs as a question's job and returns (generation, extra); the generation
        is stepped with the others until done. Returns (extra, its Answer); cancelling drops it."""
        return await self._queue(Job(ASK, next(self.order), setup, args, self.loop.create_future(), admits=True))

    async def _queue(self, job: Job) -> Any:
        def cancelled(future):
            if future.cancelled():
                job.cancelled = True  # read by the model thread before the job runs and before each step

        job.future.add_done_callback(cancelled)
        with self.wake:
            heapq.heappush(self.jobs, job)
            self.wake.notify()
        return await job.future

    def waiting(self) -> int:
        """Jobs queued (chunks, questions not started)."""
        return len(self.jobs)

    def generating(self) -> int:
        """Answers in the batch."""
        return len(self.running)

    async def close(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)
        for job in self.jobs:
            self._settle(job, error=RuntimeError("the server is shutting down"))
        for running in self.running:
            running.generation.release()
            self._settle(running.job, error=RuntimeError("the server is shutting down"))
        self.runner.between_layers = None

    # --- the model thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.jobs and not self.running:
                    if not self.wake.wait(timeout=TRIM_AFTER_S) and self.runner.static_batch is not None:
                        self.runner.static_batch.trim()  # idle: give the seats' device memory back
                if self.stopping:
                    return
            self._questions()
            if self.running:
                self._step()
            with self.wake:
                job = heapq.heappop(self.jobs) if self.jobs else None
                others = self._companions(job) if job is not None and job.owner is not None else []
            if others:
                self._together([job, *others])
            elif job is not None:
                self._do(job)

    def _companions(self, job: Job) -> list[Job]:
        """The oldest queued chunk of each other session, up to max_together - 1 (taken off the queue)."""
        owners, taken = {job.owner}, []
        for other in sorted(self.jobs):
            if len(taken) == self.max_together - 1:
                break
            if other.priority == INGEST and other.owner is not None and other.owner not in owners:
                owners.add(other.owner)
                if not other.cancelled:
                    taken.append(other)
        if taken:
            self.jobs = [j for j in self.jobs if all(j is not t for t in taken)]
            heapq.heapify(self.jobs)
        return taken

    def _together(self, jobs: list[Job]) -> None:
        """Chunks of different sessions, their probe forwards packed; each settles as it would alone."""
        live = [job for job in jobs if not job.cancelled]
        if len(live) < 2:
            for job in live:
                self._do(job)
            return
        if self.metrics is not None:
            self.metrics.ingest_together.observe(len(live))
        try:
            outcomes = ingest_together(self.runner, [functools.partial(job.fn, *job.args) for job in live])
        except Exception as exc:  # not one chunk's failure (those come back as outcomes): the loop's own
            log.exception("ingesting %d chunks together failed", len(live))
            outcomes = [(None, exc)] * len(live)
        for job, (result, error) in zip(live, outcomes):
            self._settle(job, result=result, error=error)

    def _questions(self) -> None:
        """Run the question jobs queued now (not those that arrive meanwhile: a round ends)."""
        with self.wake:
            count = sum(job.priority == ASK for job in self.jobs)
        for _ in range(count):
            with self.wake:
                job = heapq.heappop(self.jobs) if self.jobs and self.jobs[0].priority == ASK else None
            if job is None:
                return
            self._do(job)

    def _do(self, job: Job) -> None:
        if job.cancelled:
            return
        if self.metrics is not None and job.admits:
            self.metrics.queue_time.observe(time.perf_counter() - job.submitted)
        try:
            result = job.fn(*job.args)
        except Exception as exc:  # reported to the session that submitted the job
            self._settle(job, error=exc)
            return
        if not job.admits:
            self._settle(job, result=result)
            return
        generation, extra = result
        self.running.append(Running(generation, extra, job))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(generation.size)

    def _step(self) -> None:
        """One forward over the next token of up to max_batch answers (oldest first)."""
        for r in self.running:
            if r.job.cancelled:
                r.generation.release()  # its memory copy and any seat it holds, now
        self.running = [r for r in self.running if not r.job.cancelled]
        batch = self.running[:self.max_batch]
        if not batch:
            return
        self.inside = True
        before = [len(r.generation.tokens) for r in batch]
        started = time.perf_counter()
        try:
            advance(self.runner, [r.generation for r in batch])
        except Exception as exc:  # e.g. out of memory: every answer of the step fails, the server goes on
            log.exception("an answer step of %d answers failed", len(batch))
            self.running = [r for r in self.running if r not in batch]  # out before anyone hears of it
            for r in batch:
                r.generation.release()
                self._settle(r.job, error=exc)
            return
        finally:
            self.inside = False
            self.last_step_end = time.perf_counter()
            self.last_step_s = self.last_step_end - started
        self._account(batch, before)
        self.running = [r for r in self.running if not r.generation.done]  # out before anyone hears of it
        for r in batch:
            if r.generation.done:
                self._settle(r.job, result=(r.extra, r.generation.answer(self.runner.tokenizer)))

    def _account(self, batch: list[Running], before: list[int]) -> None:
        if self.metrics is None:
            return
        m, now = self.metrics, self.last_step_end
        m.batch_size.observe(len(batch))
        m.step_seconds.observe(self.last_step_s)
        for r, count in zip(batch, before):
            m.generation_tokens.inc(len(r.generation.tokens) - count)
            if r.last_token_at is None:
                m.time_to_first_token.observe(now - r.job.submitted)
            else:
                m.inter_token_latency.observe(now - r.last_token_at)
            r.last_token_at = now
            if r.generation.done:
                m.e2e_latency.observe(now - r.job.submitted)

    def _interject(self) -> None:
        """Called after each decoder layer of a job's forwards: waiting questions, and a step when due. Only on the
        model thread: the runner's hook also sees forwards other threads run on it (a test's own answers)."""
        if self.inside or threading.current_thread() is not self.thread:
            return
        due = self.running and time.perf_counter() - self.last_step_end >= self.last_step_s
        if not due and not (self.jobs and self.jobs[0].priority == ASK):
            return
        self.inside = True
        try:
            self._questions()
        finally:
            self.inside = False
        if self.running:
            self._step()

    def _settle(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        def settle():
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass
