"""One video, one question: read frames, ingest them chunk by chunk, answer. Used by `streamer ask`."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

from memory.policies import ProbedPolicy
from memory.store import KVMemory
from streamer.config import Config
from streamer.runner import Answer, Runner
from video_io.frames import Frame
from video_io.sampling import Sampling
from video_io.sources import FileSource


def read_chunks(frames: Iterator[Frame], size: int) -> Iterator[tuple[list[Frame], float]]:
    """Groups of `size` frames (the last may be shorter), each with the seconds spent reading it."""
    frames = iter(frames)
    while True:
        start = time.perf_counter()
        chunk = [frame for _, frame in zip(range(size), frames)]
        if not chunk:
            return
        yield chunk, time.perf_counter() - start


def chunk_summary(report: dict) -> dict:
    """The per-chunk fields of the public result: what the policy chose and what it cost."""
    keys = ("frames", "tokens", "ratios", "js", "kept", "evicted", "memory_tokens", "timings")
    return {key: report[key] for key in keys if key in report}


def ask_video(runner: Runner, video: str, question: str, config: Config,
              progress: Callable[[str], None] | None = None):
    """Answer `question` about the video file at `video`; returns (result record, memory)."""
    started = time.perf_counter()
    policy = config.make_policy(question)
    sampling = Sampling(frames=config.video.frames, fps=config.video.fps, max_frames=config.video.max_frames)
    source = FileSource(video, sampling, backend=config.video.backend)
    chunk_frames = config.memory.chunk_frames
    total_chunks = math.ceil(len(source) / chunk_frames)
    memory = runner.new_memory(budget=config.memory.budget or None)
    read_s = 0.0
    for number, (chunk, seconds) in enumerate(read_chunks(source, chunk_frames), start=1):
        read_s += seconds
        report = runner.ingest(memory, [frame.image for frame in chunk], policy)
        if progress:
            chosen = f", ratios {report['ratios']}" if "ratios" in report else ""
            progress(f"chunk {number}/{total_chunks}: {len(chunk)} frames ({chunk[0].ts:.1f}-{chunk[-1].ts:.1f} s), "
                     f"{report['tokens']} tokens{chosen} -> memory {memory.mean_tokens():.0f} of "
                     f"{memory.full_tokens} tokens")
    answer = runner.answer(memory, question, config.generation.max_new_tokens)
    stage = {key: sum(chunk["timings"].get(key, 0.0) for chunk in memory.chunks)
             for key in ("preprocess", "vision", "prefill", "policy", "probe", "search")}
    timings = dict(read_frames=read_s, **stage, question_prefill=answer.timings["question_prefill"],
                   decode=answer.timings["decode"], total=time.perf_counter() - started)
    result = dict(
        answer=answer.text, question=question, video=str(video), model=config.model.name, policy=policy.name,
        probe=policy.probe.mode if isinstance(policy, ProbedPolicy) else None,
        **memory_summary(memory), **answer_summary(answer), timings=timings,
    )
    return result, memory


def memory_summary(memory: KVMemory) -> dict:
    """The public fields that describe a memory."""
    return dict(
        frames=memory.frames,
        frame_grid=list(memory.grid_hw) if memory.grid_hw else None,
        chunks=[chunk_summary(report) for report in memory.chunks],
        full_tokens=memory.full_tokens,
        memory_tokens=memory.mean_tokens(),
        memory_tokens_per_layer=memory.tokens_per_layer(),
        budget=memory.budget,
        evicted_tokens=memory.evicted,
    )


def answer_summary(answer: Answer) -> dict:
    return dict(answer_tokens=len(answer.token_ids), first_token_logprobs=answer.first_token_logprobs,
                decode_tokens_per_s=answer.timings["decode_tokens_per_s"])
