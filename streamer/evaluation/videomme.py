"""Video-MME: the question table and the prompt (answers.py reads the replies).

The prompt follows lmms-eval's `videomme` task (no subtitles): its doc_to_text puts an
instruction line, the question, the options one per line (they arrive as "A. ..."), and the
task's default post_prompt (the wording: streamer/engine/benchmark_prompts.py); greedy decoding,
at most 16 new tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from streamer.engine.benchmark_prompts import videomme_prompt

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
