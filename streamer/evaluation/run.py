"""The Video-MME evaluation: resume, shard across torchrun processes, answer, merge, sum up.

Per video, the reader thread (prefetch.py) decodes the sampled frames and resizes them to model
resolution while the model works on the previous video. With the generic probe one memory per
video answers all its questions (the service's way); with the question probe the memory is
rebuilt for each question, the question being the probe (the paper's way). Policies that do
not probe (full, window, random) build one memory per video in either mode: it is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from memory.policy import ProbedPolicy
from memory.registry import POLICIES
from streamer.config import Config
from streamer.engine.runner import Runner, load_runner
from streamer.engine.stream import batched, ingest_video
from streamer.evaluation.prefetch import prefetch
from streamer.evaluation.results import (ResultWriter, load_done, merge_results, rank_path, rank_paths,
                                         read_results, shard, summarize)
from streamer.evaluation.videomme import (Question, build_prompt, extract_answer_letter, index_videos,
                                          load_questions, missing_video_message)
from video_io.errors import VideoError, VideoNotFoundError
from video_io.preprocess import VisionPreset, resize_frames
from video_io.sampling import Sampling
from video_io.sources import FileSource

log = logging.getLogger("streamer")

# The barrier waits for the slowest rank; gloo's 30-minute default would fail long, uneven shards.
# A rank that crashes makes torchrun stop the others, so a long wait never hangs for nothing.
BARRIER_TIMEOUT = timedelta(days=3)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "Distributed":
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; one process when they are not set."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            dist = cls(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
        if not 0 <= dist.rank < dist.world:
            raise ValueError(f"RANK {dist.rank} is outside WORLD_SIZE {dist.world}; launch with torchrun")
        return dist

    def device(self, device: str) -> str:
        """Under torchrun each process takes the GPU of its LOCAL_RANK, unless a specific device is asked for."""
        if self.world == 1 or device not in ("auto", "cuda"):
            return device
        if device == "auto" and not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank}"


@contextmanager
def process_group(dist: Distributed):
    """A gloo group for the final barrier (results travel through files, so no GPU collectives are needed)."""
    if dist.world == 1:
        yield
        return
    import torch.distributed as td

    td.init_process_group("gloo", rank=dist.rank, world_size=dist.world, timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        td.destroy_process_group()


def config_id(config: Config) -> str:
    """A short hash of everything that shapes the answers (the device does not), to refuse mixing runs."""
    settings = asdict(config)
    settings["model"].pop("device")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def by_video(questions: Sequence[Question]) -> dict[str, list[Question]]:
    """videoID -> its questions, videos in order of first appearance."""
    groups: dict[str, list[Question]] = {}
    for question in questions:
        groups.setdefault(question.video_id, []).append(question)
    return groups


def first_questions(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """The first `limit` questions, taken video by video (all of a video's questions before the next's)."""
    ordered = [q for group in by_video(questions).values() for q in group]
    if limit is None:
        return ordered
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return ordered[:limit]


def run(config: Config, questions_path: str | Path, videos_dir: str | Path, out: str | Path,
        limit: int | None = None, depth: int = 1, dist: Distributed = Distributed()) -> dict | None:
    """Evaluate the questions not yet in `out`; returns the summary of all of them (None on ranks > 0)."""
    questions = first_questions(load_questions(questions_path), limit)
    index_videos(videos_dir)  # a wrong folder fails now, not as one error line per question
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = config_id(config)
    done = load_done(out, key)
    groups = by_video(questions)
    todo = [q for video in shard(list(groups), dist.rank, dist.world) for q in groups[video]
            if q.question_id not in done]
    log.info("videomme: %d questions, %d already in %s, %d to evaluate%s", len(questions),
             sum(q.question_id in done for q in questions), out, len(todo),
             f" on rank {dist.rank} of {dist.world}" if dist.world > 1 else "")
    with process_group(dist):
        if todo:
            runner, _ = load_runner(config, dist.device(config.model.device))
            writer = ResultWriter(out if dist.world == 1 else rank_path(out, dist.rank))
            try:
                evaluate(runner, config, todo, videos_dir, lambda record: writer.write({**record, "config_id": key}),
                         depth, tag=f"rank {dist.rank}: " if dist.world > 1 else "")
            finally:
                writer.close()
        if dist.world > 1:
            torch.distributed.barrier()
        if dist.rank != 0:
            return None
        if parts := rank_paths(out):
            merge_results(out, parts, [q.question_id for q in questions])
        elif todo:
            merge_results(out, [], [q.question_id for q in questions])  # one line per question: a retry's answer
    results = {record["question_id"]: record for record in read_results(out)}
    return summarize([results[q.question_id] for q in questions if q.question_id in results])


def evaluate(runner: Runner, config: Config, questions: Sequence[Question], videos_dir: str | Path,
             write: Callable[[dict], None], depth: int = 1, tag: str = "") -> None:
    """Answer `questions` video by video, writing one result per question as soon as it is known.

    A video that is missing or cannot be read becomes an error line for each of its questions.
    `tag` starts each progress line (which rank is talking).
    """
    groups = by_video(questions)
    index = index_videos(videos_dir)

    def load(video_id: str) -> list[np.ndarray]:
        if video_id not in index:
            raise VideoNotFoundError(missing_video_message(videos_dir, video_id))
        return read_video(index[video_id], config, runner.preset)

    started = ready = time.perf_counter()
    answered = correct = 0
    for number, entry in enumerate(prefetch(groups, load, depth), start=1):
        video_id, video_questions = entry.item, groups[entry.item]
        wait = time.perf_counter() - ready  # the model idle, waiting for the reader
        if entry.error is None:
            records = _guard_memory(answer_video(runner, config, entry.value, video_questions, wait, entry.seconds),
                                    video_questions, runner.device)
        else:
            error = entry.error
            message = str(error) if isinstance(error, VideoError) else f"{type(error).__name__}: {error}"
            log.warning("%s%s: %s", tag, video_id, message)
            records = (failed(q, message) for q in video_questions)
        video_correct = 0
        for record in records:
            write(record)
            video_correct += record["correct"]
        ready = time.perf_counter()
        answered += len(video_questions)
        correct += video_correct
        elapsed = ready - started
        eta = elapsed / number * (len(groups) - number)
        log.info("%svideo %d/%d %s: %d/%d correct; %d questions, accuracy %.1f%%; %s elapsed, ETA %s", tag, number,
                 len(groups), video_id, video_correct, len(video_questions), answered, 100 * correct / answered,
                 _clock(elapsed), _clock(eta))


def read_video(path: Path, config: Config, preset: VisionPreset) -> list[np.ndarray]:
    """The sampled frames of one video, at model resolution: waiting in the prefetch queue, a frame
    takes ~0.3 MB at the VideoMME setting instead of ~6 MB at 1080p."""
    sampling = Sampling(frames=config.video.frames, fps=config.video.fps, max_frames=config.video.max_frames,
                        spread=config.video.spread)
    source = FileSource(path, sampling, backend=config.video.backend)
    preset = config.video_preset(preset, len(source))
    frames: list[np.ndarray] = []
    for chunk in batched(source, config.memory.chunk_frames):  # resized chunk by chunk: bounded peak
        frames.extend(resize_frames([frame.image for frame in chunk], preset))
    return frames


def answer_video(runner: Runner, config: Config, frames: list[np.ndarray], questions: Sequence[Question],
                 wait_s: float, read_s: float) -> Iterator[dict]:
    """Results for one video's questions, each yielded once answered.

    timings: read_frames (reader thread, overlapped with the model), read_wait (the model waiting
    for it), ingest (building the memory the answer used), question_prefill, decode, and total:
    this question's share of the video's time (shared waits and memories split evenly).
    """
    per_question = config.probe.mode == "question" and issubclass(POLICIES[config.memory.policy], ProbedPolicy)
    memory = None
    for question in questions:
        prompt = build_prompt(question)
        if memory is None or per_question:
            memory, ingest_s = build_memory(runner, config, frames, prompt)
        answer = runner.answer(memory, prompt, config.generation.max_new_tokens)
        prefill_s, decode_s = answer.timings["question_prefill"], answer.timings["decode"]
        share = wait_s / len(questions) + ingest_s / (1 if per_question else len(questions))
        prediction = extract_answer_letter(answer.text)
        yield dict(
            **_describe(question), prediction=prediction, reply=answer.text, correct=prediction == question.answer,
            memory_tokens=memory.mean_tokens(), full_tokens=memory.full_tokens, frames=memory.frames,
            timings=dict(read_frames=read_s, read_wait=wait_s, ingest=ingest_s, question_prefill=prefill_s,
                         decode=decode_s, total=share + prefill_s + decode_s),
            error=None,
        )


def build_memory(runner: Runner, config: Config, frames: list[np.ndarray], prompt: str):
    """The video's memory, chunk by chunk; `prompt` is the probe in question mode. Returns (memory, seconds)."""
    started = time.perf_counter()
    policy = config.make_policy(prompt)
    memory = ingest_video(runner, frames, policy, config.memory.chunk_frames,
                          runner.new_memory(budget=config.memory.budget or None))
    return memory, time.perf_counter() - started


def _guard_memory(records: Iterator[dict], questions: Sequence[Question], device: torch.device) -> Iterator[dict]:
    """Out of GPU memory on one (long) video: error lines for its questions left, and on to the next video."""
    written = 0
    try:
        for record in records:
            yield record
            written += 1
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        message = (f"out of memory on {device}; lower --frames or --max-pixels, set --budget, or use a policy "
                   "that keeps less")
        log.warning("%s: %s", questions[0].video_id, message)
        yield from (failed(q, message) for q in questions[written:])


def _describe(question: Question) -> dict:
    return dict(question_id=question.question_id, video=question.video_id, duration=question.duration,
                domain=question.domain, sub_category=question.sub_category, task_type=question.task_type,
                answer=question.answer)


def failed(question: Question, message: str) -> dict:
    return dict(**_describe(question), prediction=None, reply=None, correct=False, memory_tokens=None,
                full_tokens=None, frames=None, timings={}, error=message)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
