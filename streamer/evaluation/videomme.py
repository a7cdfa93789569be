"""Video-MME: the question table, the prompt, and the evaluation on the shared harness (harness.py: resume,
torchrun sharding, the reader thread, progress) with its own parts: reading a video, answering its questions,
scoring replies (answers.py reads them).

The prompt follows lmms-eval's `videomme` task (no subtitles): its doc_to_text puts an
instruction line, the question, the options one per line (they arrive as "A. ..."), and the
task's default post_prompt (the wording: streamer/engine/benchmark_prompts.py); greedy decoding,
at most 16 new tokens.

Per video, the reader thread decodes the sampled frames and resizes them to model resolution
while the model works on the previous video. With the generic probe one memory per video
answers all its questions (the service's way); with the question probe the memory is rebuilt
for each question, the question being the probe (the paper's way). Policies that do not probe
(full, window, random, recent) build one memory per video in either mode: it is the same.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from memory.policy import ProbedPolicy
from memory.registry import POLICIES
from streamer.config import Config
from streamer.engine.benchmark_prompts import videomme_prompt
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.evaluation import harness
from streamer.evaluation.answers import DEFAULT_SCORING, SCORING
from streamer.evaluation.results import read_results, summarize, write_results
from video_io.frames import Frame
from video_io.preprocess import VisionPreset
from video_io.sources import FileSource

log = logging.getLogger("streamer")

FIELDS = ("videoID", "question_id", "duration", "domain", "sub_category", "task_type", "question", "options",
          "answer")
LETTERS = "ABCD"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")  # in order of preference when a video has several


@dataclass(frozen=True)
class Question:
    question_id: str
    video_id: str
    duration: str  # short | medium | long
    domain: str
    sub_category: str
    task_type: str
    question: str
    options: tuple[str, ...]  # "A. ...", "B. ...", ...
    answer: str  # the correct letter


def build_prompt(question: Question) -> str:
    return videomme_prompt(question.question, list(question.options))


def load_questions(path: str | Path) -> list[Question]:
    """Questions from the Video-MME table: .parquet as published, or .json (a list of records) / .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such questions file; pass the Video-MME table (.parquet, .json or .jsonl)")
    readers = {".parquet": _read_parquet, ".json": _read_json, ".jsonl": _read_jsonl}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unknown questions format {path.suffix!r}; use .parquet, .json (a list of records) "
                         "or .jsonl, with the Video-MME fields")
    questions = [_question(path, number, record) for number, record in enumerate(reader(path), start=1)]
    if not questions:
        raise ValueError(f"{path}: holds no questions")
    seen: set[str] = set()
    repeated = sorted({q.question_id for q in questions if q.question_id in seen or seen.add(q.question_id)})
    if repeated:
        raise ValueError(f"{path}: question_id repeated: {', '.join(repeated[:5])}; each question needs its own id")
    return questions


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise ValueError(f"reading {path.name} needs pyarrow: pip install 'video-streamer[eval]' "
                         "(or convert the table to .jsonl)") from None
    try:
        return parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc}); check that the download is complete") from None


def _read_json(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); a .json questions file is one list of records") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: holds a {type(records).__name__}, not a list of records; "
                         "a .json questions file is one list (use .jsonl for one record per line)")
    return records


def _read_jsonl(path: Path) -> list:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); a .jsonl file has one JSON record per line") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from None
    return records


def _question(path: Path, number: int, record) -> Question:
    where = f"{path}, record {number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a {type(record).__name__}, not a record with the fields {', '.join(FIELDS)}")
    missing = [name for name in FIELDS if record.get(name) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; every record needs {', '.join(FIELDS)}")
    options = record["options"]
    if not (isinstance(options, (list, tuple)) and 0 < len(options) <= len(LETTERS)
            and all(isinstance(option, str) for option in options)):
        raise ValueError(f"{where}: options must be a list of 1 to {len(LETTERS)} strings like \"A. ...\", "
                         f"got {options!r}")
    answer = str(record["answer"]).strip().upper()
    if answer not in LETTERS[:len(options)]:
        raise ValueError(f"{where}: answer must be one of the option letters {', '.join(LETTERS[:len(options)])}, "
                         f"got {record['answer']!r}")
    return Question(
        question_id=str(record["question_id"]), video_id=str(record["videoID"]), duration=str(record["duration"]),
        domain=str(record["domain"]), sub_category=str(record["sub_category"]), task_type=str(record["task_type"]),
        question=str(record["question"]), options=tuple(options), answer=answer,
    )


def index_videos(folder: str | Path) -> dict[str, Path]:
    """videoID -> file, for the files in `folder` named <videoID>.mp4, .mkv or .webm (any case)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; --videos takes the folder holding <videoID>.mp4 files")
    rank = {suffix: i for i, suffix in enumerate(VIDEO_SUFFIXES)}
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in rank), key=lambda p: rank[p.suffix.lower()])
    index: dict[str, Path] = {}
    for file in files:
        index.setdefault(file.stem, file)
    return index


def missing_video_message(folder: str | Path, video_id: str) -> str:
    names = ", ".join(f"{video_id}{suffix}" for suffix in VIDEO_SUFFIXES)
    return f"no video file for videoID {video_id!r} in {folder} (looked for {names}); add it or drop its questions"


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
