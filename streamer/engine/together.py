"""Chunks of several streams ingested together, their probe forwards packed across sessions.

A chunk's ingest (Runner.ingest) is sequential code: the vision tower, the chunk's prefill, then the
memory policy's probe forwards and candidate re-runs, each depending on the one before (EMLoC walks
its layer groups from the top down, each group's re-runs on the choices above it). To batch those
forwards across sessions without turning every policy inside out, `ingest_together` runs each
chunk's ingest as a fiber (a greenlet: the same thread, switched explicitly, never preempted). When
a fiber's policy runs a probe forward, the forward (a streamer.engine.packed.Segment) is handed to
the loop here and the fiber pauses; once every fiber is paused at a forward or finished, the waiting
forwards run as one packed forward and each fiber resumes with its own result. So each chunk takes
the decisions it takes alone (its forwards' logits differ only by the rounding of matrix products
over more rows), while the probe forwards of N sessions read the weights once instead of N times.

What runs one chunk at a time: the vision tower and each chunk's prefill (hundreds to thousands of
tokens, bound by compute rather than by reading the weights: packing them would save little), the
policy's own Python between forwards, and the commit. A fiber's chunk timings count the time it
waited for the others; `fiber_waited` says how much (less its share of the packed forwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import time

import torch
from greenlet import greenlet

from streamer.engine.packed import Segment, run_segments
from streamer.engine.text_model import TextModel


class _Fiber(greenlet):
    """One chunk's ingest; `hand_off` is how its forwards reach the loop."""

    def __init__(self, run: Callable[[], Any], hand_off: Callable[[Segment], torch.Tensor]):
        super().__init__(run)
        self.hand_off = hand_off
        self.paused_at = 0.0
        self.waited = 0.0  # seconds paused while others ran, less its share of the packed forwards


def fiber_forward() -> Callable[[Segment], torch.Tensor] | None:
    """Inside a chunk ingested together: how its probe forwards run (packed with the other chunks'); else None."""
    current = greenlet.getcurrent()
    return current.hand_off if isinstance(current, _Fiber) else None


def fiber_waited() -> float:
    """Inside a chunk ingested together: the seconds it has waited for the others so far; else 0."""
    current = greenlet.getcurrent()
    return current.waited if isinstance(current, _Fiber) else 0.0


def ingest_together(runner: TextModel, calls: list[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
    """Run every call (a chunk's ingest) to its end, their probe forwards packed; per call (result, None) or
    (None, the exception it raised). One call's failure, or a packed forward's, fails only the calls it reaches."""
    outcomes: list[tuple[Any, BaseException | None]] = [(None, None)] * len(calls)
    waiting: dict[int, Segment] = {}

    def hand_off(segment: Segment) -> torch.Tensor:
        return greenlet.getcurrent().parent.switch(segment)  # paused until the packed forward's result comes back

    def resume(i: int, fiber: _Fiber, method: Callable) -> None:
        try:
            handed = method()
        except Exception as exc:  # the chunk's ingest failed: its session hears of it, the others go on
            outcomes[i] = (None, exc)
            return
        if fiber.dead:
            outcomes[i] = (handed, None)
        else:
            waiting[i] = handed
            fiber.paused_at = time.perf_counter()

    # one inference mode around all fibers: each fiber's own (Runner.ingest's) then enters and leaves it inside this
    # one, so a fiber that finishes first cannot switch it off under another that is paused inside its own
    with torch.inference_mode():
        fibers = [_Fiber(call, hand_off) for call in calls]
        for i, fiber in enumerate(fibers):
            resume(i, fiber, fiber.switch)
        while waiting:
            batch = sorted(waiting.items())
            waiting.clear()
            started = time.perf_counter()
            try:
                results = run_segments(runner, [segment for _, segment in batch])
            except Exception as exc:  # e.g. out of memory: every fiber of this forward fails, its stack unwinding
                for i, _ in batch:
                    resume(i, fibers[i], lambda fiber=fibers[i], error=exc: fiber.throw(error))
                continue
            share = (time.perf_counter() - started) / len(batch)
            for (i, _), result in zip(batch, results):
                fibers[i].waited += time.perf_counter() - fibers[i].paused_at - share
                resume(i, fibers[i], lambda fiber=fibers[i], result=result: fiber.switch(result))
    return outcomes
