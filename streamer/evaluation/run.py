"""The Video-MME evaluation on the shared harness (harness.py: resume, torchrun sharding, the reader
thread, progress), and its own parts: reading a video, answering its questions, scoring replies.

Per video, the reader thread decodes the sampled frames and resizes them to model resolution
while the model works on the previous video. With the generic probe one memory per video
answers all its questions (the service's way); with the question probe the memory is rebuilt
for each question, the question being the probe (the paper's way). Policies that do not probe
(full, window, random, recent) build one memory per video in either mode: it is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from memory.policy import ProbedPolicy
from memory.registry import POLICIES
from streamer.config import Config
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.evaluation import harness
from streamer.evaluation.answers import DEFAULT_SCORING, SCORING
from streamer.evaluation.results import read_results, summarize, write_results
from streamer.evaluation.videomme import (LETTERS, Question, build_prompt, index_videos, load_questions,
                                          missing_video_message)
from video_io.frames import Frame
from video_io.preprocess import VisionPreset
from video_io.sources import FileSource

log = logging.getLogger("streamer")

# Result lines written before lines named their scoring rule were scored by extract_answer_letter.
UNNAMED_SCORING = "strict"


def benchmark(config: Config, questions: Sequence[Question], videos_dir: str | Path,
              scoring: str = DEFAULT_SCORING) -> harness.Benchmark:
    index = index_videos(videos_dir)  # a wrong folder fails now, not as one error line per question
    return harness.Benchmark(
        name="videomme", key="question_id", questions=questions, video_of=lambda q: q.video_id,
        path_of=index.get, missing=lambda video: missing_video_message(videos_dir, video),
        read=lambda runner, path, _: read_video(path, config, runner.preset),
        answer=lambda runner, frames, asked, wait_s, read_s, progress: answer_video(
            runner, config, frames, asked, wait_s, read_s, scoring, progress),
        failed=failed)


def run(config: Config, questions_path: str | Path, videos_dir: str | Path, out: str | Path,
        limit: int | None = None, depth: int = 1, dist: harness.Distributed = harness.Distributed(),
        scoring: str = DEFAULT_SCORING) -> dict | None:
    """Evaluate the questions not yet in `out`, reading replies by the rule `scoring` (answers.SCORING);
    returns the summary of all of them (None on ranks > 0). Lines already in `out` keep their replies and
    are scored again by `scoring` if another rule scored them."""
    if scoring not in SCORING:
        raise ValueError(f"unknown scoring rule {scoring!r}; choose one of {', '.join(SCORING)}")
    questions = harness.first_questions(load_questions(questions_path), lambda q: q.video_id, limit)
    if harness.run(config, benchmark(config, questions, videos_dir, scoring), out, depth, dist) is None:
        return None
    results = {record["question_id"]: record for record in rescore_results(Path(out), scoring)}
    return dict(scoring=scoring, **summarize([results[q.question_id] for q in questions if q.question_id in results]))


def predict(reply: str | None, scoring: str) -> str | None:
    """The letter the rule `scoring` reads in a reply; None for none, or for no reply (an error line)."""
    return SCORING[scoring](reply, list(LETTERS)) if reply is not None else None


def rescore(record: dict, scoring: str) -> dict:
    """A result line with its prediction read again from its reply by the rule `scoring`."""
    prediction = predict(record["reply"], scoring)
    return {**record, "prediction": prediction, "correct": prediction == record["answer"], "scoring": scoring}


def rescore_results(out: Path, scoring: str) -> list[dict]:
    """The lines of `out`, each scored by the rule `scoring`; `out` is rewritten if that changed any (lines
    of an earlier run with another --scoring)."""
    records = read_results(out)
    rescored = [rescore(record, scoring) for record in records]
    # lines with a reply that another rule read (a failed line has none: it only gets the rule's name)
    changed = [old for old, new in zip(records, rescored) if old["reply"] is not None and old != new]
    if changed:
        earlier = sorted({record.get("scoring", UNNAMED_SCORING) for record in changed} - {scoring})
        log.info("videomme: %d of %d lines in %s scored again from their replies by the %s rule (they were "
                 "scored by %s)", len(changed), len(records), out, scoring, ", ".join(earlier) or f"an earlier {scoring}")
    if rescored != records:
        write_results(out, rescored)
    return rescored


def read_video(path: Path, config: Config, preset: VisionPreset) -> tuple[list[Frame], float]:
    """The sampled frames of one video at model resolution, and the rate they were sampled at."""
    source = FileSource(path, config.video.sampling(), backend=config.video.backend)
    return harness.read_resized(source, config, preset), source.sampled_fps


def answer_video(runner: Runner, config: Config, video: tuple[list[Frame], float], questions: Sequence[Question],
                 wait_s: float, read_s: float, scoring: str, progress: harness.Progress) -> Iterator[dict]:
    """Results for one video's questions, each yielded once answered, its reply read by the rule `scoring`.

    timings: read_frames (reader thread, overlapped with the model), read_wait (the model waiting
    for it), ingest (building the memory the answer used), question_prefill, decode, and total:
    this question's share of the video's time (shared waits and memories split evenly).
    """
    per_question = config.probe.mode == "question" and issubclass(POLICIES[config.memory.policy], ProbedPolicy)
    memory = None
    for question in questions:
        prompt = build_prompt(question)
        if memory is None or per_question:
            memory, ingest_s = build_memory(runner, config, video, prompt, progress)
        answer = runner.answer(memory, prompt, config.generation.max_new_tokens)
        prefill_s, decode_s = answer.timings["question_prefill"], answer.timings["decode"]
        share = wait_s / len(questions) + ingest_s / (1 if per_question else len(questions))
        prediction = predict(answer.text, scoring)
        yield dict(
            **_describe(question), prediction=prediction, reply=answer.text, correct=prediction == question.answer,
            memory_tokens=memory.mean_tokens(), full_tokens=memory.full_tokens, frames=memory.frames,
            timings=dict(read_frames=read_s, read_wait=wait_s, ingest=ingest_s, question_prefill=prefill_s,
                         decode=decode_s, total=share + prefill_s + decode_s),
            error=None, scoring=scoring,
        )


def build_memory(runner: Runner, config: Config, video: tuple[list[Frame], float], prompt: str,
                 progress: harness.Progress):
    """The video's memory, chunk by chunk; `prompt` is the probe in question mode. Returns (memory, seconds)."""
    frames, fps = video
    started = time.perf_counter()
    policy = config.make_policy(prompt)
    chunk = config.memory.chunk_frames
    memory = ingest_video(runner, frames, policy, chunk, runner.new_memory(**config.memory.limits()),
                          on_chunk=lambda number, _, __: progress.chunk(number, min(number * chunk, len(frames)),
                                                                         len(frames)),
                          fps=fps)  # Qwen2.5-VL's positions follow the frames' time
    return memory, time.perf_counter() - started


def _describe(question: Question) -> dict:
    return dict(question_id=question.question_id, video=question.video_id, duration=question.duration,
                domain=question.domain, sub_category=question.sub_category, task_type=question.task_type,
                answer=question.answer)


def failed(question: Question, message: str) -> dict:
    return dict(**_describe(question), prediction=None, reply=None, correct=False, memory_tokens=None,
                full_tokens=None, frames=None, timings={}, error=message)
