"""Frames in, memory out: the one loop that cuts a sequence of frames into chunks and ingests them.

Every front end that reads a whole video (`streamer ask`, the evaluations, the bench) and the
tests stream through `ingest_video`; the websocket session, whose frames arrive one by one,
cuts its own chunks and calls Runner.ingest per chunk (streamer/service/session.py). A question
asked mid-chunk sees the frames since the last chunk through `with_newest`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from memory.policy import MemoryPolicy
from memory.store import ChunkRecord, KVMemory
from streamer.engine.runner import Runner
from video_io.frames import Frame
from video_io.preprocess import VisionPreset

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    items = iter(items)
    while chunk := [item for _, item in zip(range(size), items)]:
        yield chunk


def ingest_video(runner: Runner, frames: Iterable[np.ndarray | Frame], policy: MemoryPolicy, chunk_frames: int,
                 memory: KVMemory | None = None, on_chunk: Callable[[int, list, ChunkRecord], None] | None = None,
                 preset: VisionPreset | None = None, fps: float | None = None) -> KVMemory:
    """Ingest `frames` (arrays, or video_io Frames) `chunk_frames` at a time into `memory` (default: a new,
    unbounded one) and return it.

    Frames are pulled lazily, so a file is decoded chunk by chunk; each chunk's record gets
    timings["read"], the seconds spent waiting for its frames. on_chunk(number, chunk, record) is
    called after each chunk (numbers from 1), e.g. for progress lines. `preset` overrides the runner's
    frame resolution for this video; `fps`: the rate the frames were sampled at (Runner.ingest).
    """
    memory = memory if memory is not None else runner.new_memory()
    chunks = batched(frames, chunk_frames)
    number = 0
    while True:
        started = time.perf_counter()
        chunk = next(chunks, None)
        if chunk is None:
            return memory
        read_s = time.perf_counter() - started
        number += 1
        images = [frame.image if isinstance(frame, Frame) else frame for frame in chunk]
        record = runner.ingest(memory, images, policy, preset, fps)
        record.timings["read"] = read_s
        if on_chunk is not None:
            on_chunk(number, chunk, record)


def with_newest(runner: Runner, memory: KVMemory, frames: Sequence[np.ndarray | Frame], policy: MemoryPolicy,
                chunk_frames: int, preset: VisionPreset | None = None, fps: float | None = None) -> KVMemory:
    """What a question asked now sees: the memory as it would stand had the stream ended now, i.e. with
    `frames`, the newest ones, not in it yet, ingested by `policy` as its last chunks (the final one short)
    in a fork. The memory itself is unchanged and takes those frames later, in the chunks they complete:
    committed now, each question asked mid-chunk would leave a short chunk behind, cut at its own ratio for
    good (on the OVO-Bench sets that cost 5-7 points against a memory built afresh up to the question)."""
    if not frames:
        return memory
    return ingest_video(runner, frames, policy, chunk_frames, memory.fork(), preset=preset, fps=fps)
