"""What every benchmark evaluation shares: resume, torchrun sharding, the reader thread, progress.

A benchmark describes itself as a `Benchmark`: its questions in file order, the field that
names a question in result lines, the video each question needs, how a video is read (on the
reader thread, prefetch.py) and how its questions are answered. `run` answers the questions
not yet in OUT (error lines are retried), each rank of a torchrun launch taking every world-th
video, and merges the ranks' lines into OUT at the end.

Progress: one line per video with the questions answered and an ETA, and inside a long video a
line at most every PROGRESS_EVERY_S seconds with the chunks ingested. The ETA weighs the
videos left by their file size (a proxy for their length, known before they are read), so a
benchmark that lists its short videos first does not promise an early finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from streamer.config import Config
from streamer.engine.runner import Runner, load_runner
from streamer.engine.stream import batched
from streamer.evaluation.prefetch import prefetch
from streamer.evaluation.results import ResultWriter, load_done, merge_results, rank_path, rank_paths, read_results, shard
from video_io.errors import VideoError
from video_io.frames import Frame
from video_io.preprocess import VisionPreset, resize_frames
from video_io.sources import FileSource

log = logging.getLogger("streamer")

# The barrier waits for the slowest rank; gloo's 30-minute default would fail long, uneven shards.
# A rank that crashes makes torchrun stop the others, so a long wait never hangs for nothing.
BARRIER_TIMEOUT = timedelta(days=3)
PROGRESS_EVERY_S = 30.0


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


def config_id(config: Config, **settings) -> str:
    """A short hash of everything that shapes the answers (the device does not; `settings` adds what is
    not in the config, e.g. a benchmark's mode), to refuse mixing runs in one OUT."""
    values = asdict(config)
    values["model"].pop("device")
    return hashlib.sha256(json.dumps({**values, **settings}, sort_keys=True).encode()).hexdigest()[:12]


class Progress:
    """Lines about the work inside one video, at most one every PROGRESS_EVERY_S seconds."""

    def __init__(self, tag: str, label: str):
        self.tag, self.label = tag, label
        self.last = time.perf_counter()

    def chunk(self, number: int, frames: int, total: int) -> None:
        """Chunk `number` ingested; `frames` of the video's `total` frames are in the memory."""
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.last = time.perf_counter()
            log.info("%s%s: chunk %d ingested, %d/%d frames", self.tag, self.label, number, frames, total)


@dataclass
class Benchmark:
    name: str
    key: str  # the result field that names a question (and the questions' attribute of that name)
    questions: Sequence[Any]  # in file order
    video_of: Callable[[Any], str]  # question -> the video it needs
    path_of: Callable[[str], Path | None]  # video -> its file, None if missing
    missing: Callable[[str], str]  # video -> why it cannot be found and what to do
    # (runner, video file, its questions) -> what `answer` needs; runs on the reader thread
    read: Callable[[Runner, Path, Sequence[Any]], Any]
    # (runner, what read returned, questions, seconds the model waited for it, seconds reading took, progress)
    # -> one result line per question, each yielded once answered
    answer: Callable[[Runner, Any, Sequence[Any], float, float, Progress], Iterator[dict]]
    failed: Callable[[Any, str], dict]  # (question, message) -> its error line

    def by_video(self, questions: Sequence[Any]) -> dict[str, list[Any]]:
        return by_video(questions, self.video_of)


def by_video(questions: Sequence[Any], video_of: Callable[[Any], str]) -> dict[str, list[Any]]:
    """video -> its questions, videos in order of first appearance."""
    groups: dict[str, list[Any]] = {}
    for question in questions:
        groups.setdefault(video_of(question), []).append(question)
    return groups


def first_questions(questions: Sequence[Any], video_of: Callable[[Any], str], limit: int | None) -> list[Any]:
    """The first `limit` questions, taken video by video (all of a video's questions before the next's)."""
    ordered = [q for group in by_video(questions, video_of).values() for q in group]
    if limit is None:
        return ordered
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return ordered[:limit]


def run(config: Config, benchmark: Benchmark, out: str | Path, depth: int = 1,
        dist: Distributed = Distributed(), settings: dict | None = None) -> list[dict] | None:
    """Answer the benchmark's questions not yet in `out`; returns every result line, in question order
    (None on ranks > 0). `settings` (beside the config) go into the config_id that guards `out`."""
    key = benchmark.key
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_key = config_id(config, **(settings or {}))
    done = load_done(out, config_key, key)
    groups = benchmark.by_video(benchmark.questions)
    todo = [q for video in shard(list(groups), dist.rank, dist.world) for q in groups[video]
            if getattr(q, key) not in done]
    log.info("%s: %d questions, %d already in %s, %d to evaluate%s", benchmark.name, len(benchmark.questions),
             sum(getattr(q, key) in done for q in benchmark.questions), out, len(todo),
             f" on rank {dist.rank} of {dist.world}" if dist.world > 1 else "")
    order = [getattr(q, key) for q in benchmark.questions]
    with process_group(dist):
        if todo:
            runner, _ = load_runner(config, dist.device(config.model.device))
            writer = ResultWriter(out if dist.world == 1 else rank_path(out, dist.rank))
            try:
                evaluate(runner, benchmark, todo, lambda record: writer.write({**record, "config_id": config_key}),
                         depth, tag=f"rank {dist.rank}: " if dist.world > 1 else "")
            finally:
                writer.close()
        if dist.world > 1:
            torch.distributed.barrier()
        if dist.rank != 0:
            return None
        if parts := rank_paths(out):
            merge_results(out, parts, order, key)
        elif todo:
            merge_results(out, [], order, key)  # one line per question: a retry's answer replaces its error line
    results = {record[key]: record for record in read_results(out, key)}
    return [results[name] for name in order if name in results]


def evaluate(runner: Runner, benchmark: Benchmark, questions: Sequence[Any], write: Callable[[dict], None],
             depth: int = 1, tag: str = "") -> None:
    """Answer `questions` video by video, writing one result per question as soon as it is known. A video
    that is missing or cannot be read becomes an error line for each of its questions; out of GPU memory on
    one video, error lines for its questions left. `tag` starts each progress line (which rank is talking)."""
    groups = benchmark.by_video(questions)
    paths = {video: benchmark.path_of(video) for video in groups}
    sizes = {video: path.stat().st_size if path is not None else 0 for video, path in paths.items()}

    def load(video: str):
        if paths[video] is None:
            raise FileNotFoundError(benchmark.missing(video))
        return benchmark.read(runner, paths[video], groups[video])

    started = ready = time.perf_counter()
    answered = correct = 0
    bytes_done, bytes_total = 0, sum(sizes.values())
    for number, entry in enumerate(prefetch(groups, load, depth), start=1):
        video, video_questions = entry.item, groups[entry.item]
        wait = time.perf_counter() - ready  # the model idle, waiting for the reader
        if entry.error is None:
            progress = Progress(tag, f"video {number}/{len(groups)} {video}")
            records = _guard_memory(benchmark, benchmark.answer(runner, entry.value, video_questions, wait,
                                                                entry.seconds, progress), video_questions, runner)
        else:
            error = entry.error
            message = str(error) if isinstance(error, (VideoError, FileNotFoundError)) else \
                f"{type(error).__name__}: {error}"
            log.warning("%s%s: %s", tag, video, message)
            records = (benchmark.failed(q, message) for q in video_questions)
        video_correct = 0
        for record in records:
            write(record)
            video_correct += bool(record["correct"])
        ready = time.perf_counter()
        answered += len(video_questions)
        correct += video_correct
        bytes_done += sizes[video]
        elapsed = ready - started
        left = (bytes_total - bytes_done) / bytes_done if bytes_done else (len(groups) - number) / number
        log.info("%svideo %d/%d %s: %d/%d correct; %d questions, accuracy %.1f%%; %s elapsed, ETA %s", tag, number,
                 len(groups), video, video_correct, len(video_questions), answered, 100 * correct / answered,
                 clock(elapsed), clock(elapsed * left))


def _guard_memory(benchmark: Benchmark, records: Iterator[dict], questions: Sequence[Any],
                  runner: Runner) -> Iterator[dict]:
    """Out of GPU memory on one (long) video: error lines for its questions left, and on to the next video."""
    written = set()
    try:
        for record in records:
            yield record
            written.add(record[benchmark.key])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        message = (f"out of memory on {runner.device}; lower --fps/--frames or --max-pixels, set --budget, or use "
                   "a policy that keeps less")
        log.warning("%s: %s", benchmark.video_of(questions[0]), message)
        yield from (benchmark.failed(q, message) for q in questions if getattr(q, benchmark.key) not in written)


def read_resized(source: FileSource, config: Config, preset: VisionPreset) -> list[Frame]:
    """A source's frames at model resolution, resized chunk by chunk (a bounded peak): waiting in the prefetch
    queue, a frame takes ~0.3 MB at the VideoMME setting instead of ~6 MB at 1080p."""
    preset = config.video_preset(preset, len(source))
    frames: list[Frame] = []
    for chunk in batched(source, config.memory.chunk_frames):
        images = resize_frames([frame.image for frame in chunk], preset)
        frames.extend(replace(frame, image=image) for frame, image in zip(chunk, images))
    return frames


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
