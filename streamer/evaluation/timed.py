"""Benchmarks whose questions are asked at a moment of the video: OVO-Bench and StreamingBench.

Streaming mode (the service's way, the default): a video is read once, at the configured
rate, up to its last question; its frames go into one memory chunk by chunk, and when the
stream reaches a question's time the question is answered against the memory as it would stand
had the stream ended there: the frames read since its last chunk go in as a short last chunk,
in a copy (streamer.engine.stream.with_newest), as the service answers. No frame after that
time has been seen when it is answered, and the questions of a video share the memory, as the
clients of the service do. Clip mode (what the papers do): each question gets a memory built
afresh from the frames up to the benchmark's own cut (`clip_end`) by the same rule, so with a
deterministic policy a question whose cut is its time gets the same answer in either mode.

Frames are chosen at `video.fps` over the part of the video up to the last question, so the
rate does not depend on what comes after it; `video.max_frames` caps them (then spread evenly).
In clip mode a frame count (`video.frames`) may be given instead: it is spread over each clip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from memory.store import KVMemory
from streamer.config import Config
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video, with_newest
from streamer.evaluation.harness import Benchmark, Progress, read_resized
from streamer.evaluation.results import mean_of
from streamer.text import counted
from video_io.frames import Frame
from video_io.preprocess import VisionPreset
from video_io.sources import FileSource

MODES = ("stream", "clip")


@dataclass(frozen=True)
class TimedQuestion:
    id: str  # the benchmark's own id ("<id>_<probe>" for each probe time of a forward-active item)
    video: str  # the video as the benchmark's file names it, relative to the videos folder
    task: str
    category: str  # OVO-Bench: backward / realtime / forward; StreamingBench: ""
    time: float  # seconds into the video at which it is asked
    clip_end: float  # where the benchmark's own offline evaluation cuts the video for it
    prompt: str  # the whole question turn, as the benchmark's script writes it
    answer: str  # what its scorer compares with: a letter, "Yes" / "No", or a count


# (question, reply) -> (what the reply answers, whether the benchmark's scorer counts it right)
Scorer = Callable[[TimedQuestion, str], tuple[str | None, bool]]


def read_list(path: str | Path, expected: str) -> list:
    """The non-empty JSON list in a benchmark's file; `expected` names the file the user should pass."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; pass {expected}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); pass {expected}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list, as in {expected}")
    return data


def check_config(config: Config, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if config.video.fps is None and mode == "stream":
        raise ValueError("streaming mode samples frames by rate (--fps): a frame count (--frames) is spread over "
                         "a known length, which only clip mode has (--mode clip: N frames over each clip)")
    if mode == "stream" and config.probe.mode == "question":
        raise ValueError("streaming mode builds one memory that every question of a video shares, so the probe "
                         "cannot be the question: use probe mode generic, or --mode clip")


@dataclass
class Clip:
    frames: list[Frame]  # at model resolution
    fps: float  # frames per second of video time they were sampled at (Qwen2.5-VL's positions follow it)


def read_until(path, config: Config, preset: VisionPreset, until: float) -> Clip:
    """The frames sampled as configured (video.fps, or video.frames spread as video.spread) over the video up
    to `until` seconds, at model resolution; decoding stops there."""
    source = FileSource(path, config.video.sampling(), backend=config.video.backend, until=until)
    return Clip(read_resized(source, config, preset), source.sampled_fps)


def ask_order(questions: Sequence[TimedQuestion]) -> list[TimedQuestion]:
    """The questions by time (file order among equal times): the order a stream reaches them."""
    return sorted(questions, key=lambda q: q.time)


class _Stream:
    """One memory fed the video's frames up to a moment, chunk by chunk."""

    def __init__(self, runner: Runner, config: Config, policy, clip: Clip, progress: Progress):
        self.runner, self.config, self.policy, self.progress = runner, config, policy, progress
        self.frames, self.fps = clip.frames, clip.fps
        self.memory: KVMemory = runner.new_memory(**config.memory.limits())
        self.read = 0  # frames ingested
        self.seen = 0  # frames read up to the question's time: those ingested, then the newest, not a chunk yet

    def _ingested(self, frames: int) -> None:
        self.read += frames
        self.progress.chunk(self.memory.chunk_count, self.read, len(self.frames))

    def advance(self, until: float) -> tuple[KVMemory, float]:
        """Read every frame up to `until` seconds: full chunks into the memory, the rest as a short chunk
        into the copy a question then sees (with_newest), which is returned with the seconds it took."""
        started = time.perf_counter()
        while self.seen < len(self.frames) and self.frames[self.seen].ts <= until:
            self.seen += 1
        chunk = self.config.memory.chunk_frames
        whole = self.read + (self.seen - self.read) // chunk * chunk
        ingest_video(self.runner, self.frames[self.read:whole], self.policy, chunk, self.memory,
                     on_chunk=lambda _, frames, __: self._ingested(len(frames)), fps=self.fps)
        asked = with_newest(self.runner, self.memory, self.frames[self.read:self.seen], self.policy, chunk,
                            fps=self.fps)
        return asked, time.perf_counter() - started


def read_clips(path, config: Config, preset: VisionPreset, mode: str,
               questions: Sequence[TimedQuestion]) -> dict[float, Clip]:
    """cut -> the frames a question with that clip_end is answered from. Sampled by rate, one read up to
    the last question serves every question (each takes the frames up to its own cut); a frame count
    (clip mode) is spread over each clip, so each cut is read on its own, as the papers cut their clips."""
    if mode == "clip" and config.video.frames is not None:
        return {end: read_until(path, config, preset, end) for end in sorted({q.clip_end for q in questions})}
    last = max(max(q.time, q.clip_end) for q in questions)
    return {last: read_until(path, config, preset, last)}


def answer_video(runner: Runner, config: Config, clips: dict[float, Clip], questions: Sequence[TimedQuestion],
                 score: Scorer, mode: str, wait_s: float, read_s: float, progress: Progress) -> Iterator[dict]:
    """Results for one video's questions in the order they are asked, each yielded once answered."""
    stream = None
    for question in ask_order(questions):
        clip = clips.get(question.clip_end) or clips[max(clips)]
        frames = clip.frames
        if mode == "stream":
            stream = stream or _Stream(runner, config, config.make_policy(), clip, progress)
            memory, ingest_s = stream.advance(question.time)
        else:
            stream = _Stream(runner, config, config.make_policy(question.prompt), clip, progress)
            memory, ingest_s = stream.advance(question.clip_end)
        if stream.seen == 0:
            yield failed(question, f"asked at {question.time:g} s, before the first sampled frame "
                                   f"({frames[0].ts:g} s)" if frames else "the video has no frames")
            continue
        answer = runner.answer(memory, question.prompt, config.generation.max_new_tokens)
        prediction, correct = score(question, answer.text)
        yield dict(
            **describe(question), frames_seen=stream.seen, last_frame_time=frames[stream.seen - 1].ts,
            reply=answer.text, prediction=prediction, correct=correct,
            memory_tokens=memory.mean_tokens(), full_tokens=memory.full_tokens,
            ttft_s=answer.timings["question_prefill"],
            timings=dict(read_frames=read_s, read_wait=wait_s, ingest=ingest_s,
                         question_prefill=answer.timings["question_prefill"], decode=answer.timings["decode"]),
            error=None,
        )
        wait_s = read_s = 0.0  # the video's reading is counted once, with its first question


def describe(question: TimedQuestion) -> dict:
    return dict(id=question.id, video=question.video, task=question.task, category=question.category,
                time=question.time, answer=question.answer)


def failed(question: TimedQuestion, message: str) -> dict:
    return dict(**describe(question), frames_seen=0, last_frame_time=None, reply=None, prediction=None,
                correct=False, memory_tokens=None, full_tokens=None, ttft_s=None, timings={}, error=message)


def format_run(summary: dict) -> str:
    line = (f"{counted(summary['questions'], 'question')} on {counted(summary['videos'], 'video')}, "
            f"{summary['errors']} failed (counted wrong)")
    if summary["mean_memory_tokens"] is not None:
        line += (f"; memory: mean {summary['mean_memory_tokens']:.0f} tokens per layer of {summary['mean_full_tokens']:.0f}"
                 f" unpruned, {summary['mean_frames_seen']:.0f} frames seen; time to first token {summary['mean_ttft_s']:.3f} s")
    return line


def run_summary(records: Sequence[dict]) -> dict:
    """What every timed benchmark's table adds: errors, mean memory and answer latency."""
    answered = [r for r in records if r.get("error") is None]
    return dict(questions=len(records), errors=len(records) - len(answered), videos=len({r["video"] for r in records}),
                mean_memory_tokens=mean_of([r["memory_tokens"] for r in answered]),
                mean_full_tokens=mean_of([r["full_tokens"] for r in answered]),
                mean_ttft_s=mean_of([r["ttft_s"] for r in answered]),
                mean_frames_seen=mean_of([r["frames_seen"] for r in answered]))



def video_file(videos: Path, name: str) -> Path | None:
    """The file of a video the benchmark names by a path relative to its videos folder ("./videos/x.mp4"
    and "Ego4D/clips/x.mp4" alike), else by its file name directly in the folder; None if neither exists.
    A name that points outside the folder is refused."""
    root = videos.resolve()
    relative = Path(name)
    for candidate in (root / relative, root / relative.name):
        candidate = candidate.resolve()
        if not candidate.is_relative_to(root):
            raise ValueError(f"video {name!r} lies outside the videos folder {videos}; refusing to read it")
        if candidate.is_file():
            return candidate
    return None


def benchmark(name: str, questions: Sequence[TimedQuestion], videos: str | Path, config: Config, mode: str,
              score: Scorer) -> Benchmark:
    """A timed benchmark for harness.run: each video read up to its last question, answered in `mode`."""
    check_config(config, mode)
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"{videos}: no such folder; pass the folder holding the benchmark's videos")

    def read(runner: Runner, path: Path, asked: Sequence[TimedQuestion]) -> dict[float, Clip]:
        return read_clips(path, config, runner.preset, mode, asked)

    def answer(runner, clips, asked, wait_s, read_s, progress):
        return answer_video(runner, config, clips, asked, score, mode, wait_s, read_s, progress)

    return Benchmark(name=name, key="id", questions=questions, video_of=lambda q: q.video,
                     path_of=lambda video: video_file(videos, video),
                     missing=lambda video: f"not found in {videos} (as a path below it, or by its file name); "
                                           "check --videos",
                     read=read, answer=answer, failed=failed)
