"""Result lines: one JSON object per question, written durably, resumed, sharded, merged and summed up."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from streamer.text import counted

DURATIONS = ("short", "medium", "long")


class ResultWriter:
    """Appends result lines; each is flushed and fsynced, so a kill loses at most the line being written."""

    def __init__(self, path: Path):
        _drop_partial_tail(path)
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _drop_partial_tail(path: Path) -> None:
    """Cut an unfinished last line (a process killed mid-write) so that appending starts on a new line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_results(path: Path, key: str = "question_id") -> list[dict]:
    """The complete lines of a result file; an unfinished last line (no newline yet) is left out. Each
    names its question in the field `key`."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # what follows the last newline is unfinished
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not a result line ({exc}); delete that line (its question "
                             "will be evaluated again) or pass another --out") from None
        if not isinstance(record, dict) or key not in record:
            raise ValueError(f"{path}, line {number}: not a result line (no {key}); pass another --out")
        records.append(record)
    return records


def rank_path(out: Path, rank: int) -> Path:
    """Where rank `rank` of a multi-process run writes: results.jsonl -> results.rank3.jsonl."""
    stem = out.stem if out.suffix == ".jsonl" else out.name
    return out.with_name(f"{stem}.rank{rank}.jsonl")


def rank_paths(out: Path) -> list[Path]:
    """The rank files of `out` left by a multi-process run (merged or not yet)."""
    stem = out.stem if out.suffix == ".jsonl" else out.name
    return sorted(out.parent.glob(f"{stem}.rank*.jsonl"))


def _prefer(kept: dict | None, record: dict) -> bool:
    """Whether `record` should replace `kept` for its question: the first answer wins, and any answer
    wins over an error line (the question was evaluated again after its video was fixed)."""
    return kept is None or (kept.get("error") is not None and record.get("error") is None)


def load_done(out: Path, config_id: str, key: str = "question_id") -> dict[str, dict]:
    """question (field `key`) -> answered result, from OUT and any rank files; refuses results made with
    another configuration. Error lines (a video missing or unreadable) are not done: those questions run again."""
    done: dict[str, dict] = {}
    for path in [out, *rank_paths(out)]:
        for record in read_results(path, key):
            other = record.get("config_id", config_id)
            if other != config_id:
                raise ValueError(
                    f"{path} holds results of another configuration (config_id {other}, this run {config_id}); "
                    "pass another --out, or delete the file to start over")
            if record.get("error") is None:
                done.setdefault(record[key], record)
    return done


def shard(video_ids: Sequence[str], rank: int, world: int) -> list[str]:
    """The videos rank `rank` of `world` evaluates: every world-th one, so each rank gets a mix of lengths."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return list(video_ids[rank::world])


def merge_results(out: Path, parts: Iterable[Path], order: Sequence[str], key: str = "question_id") -> None:
    """Rewrite OUT as OUT plus the rank files, one line per question (the first answer seen, else the first
    error line), then delete them.

    Lines follow `order` (values of the field `key`); lines of questions not in it come last. OUT is replaced
    as write_results does.
    """
    parts = list(parts)
    merged: dict[str, dict] = {}
    for path in [out, *parts]:
        for record in read_results(path, key):
            if _prefer(merged.get(record[key]), record):
                merged[record[key]] = record
    position = {question_id: i for i, question_id in enumerate(order)}
    write_results(out, sorted(merged.values(), key=lambda r: position.get(r[key], len(position))))
    for path in parts:
        path.unlink()


def write_results(out: Path, records: Iterable[dict]) -> None:
    """Replace OUT by these lines: written beside it and renamed over it, so a kill leaves either the old
    or the new file."""
    temporary = out.with_name(out.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, out)


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy (percent; failed questions count as wrong) overall, per duration and per task type; the
    mean memory, retention and seconds per video over the questions answered."""
    answered = [r for r in records if r.get("error") is None]
    seconds_per_video: dict[str, float] = defaultdict(float)
    for record in answered:
        seconds_per_video[record["video"]] += record["timings"]["total"]
    durations = sorted({r["duration"] for r in records},
                       key=lambda d: (DURATIONS.index(d) if d in DURATIONS else len(DURATIONS), d))
    return dict(
        **tally(records),
        errors=len(records) - len(answered),
        videos=len({r["video"] for r in records}),
        by_duration={d: tally([r for r in records if r["duration"] == d]) for d in durations},
        by_task_type={t: tally([r for r in records if r["task_type"] == t])
                      for t in sorted({r["task_type"] for r in records})},
        mean_memory_tokens=mean_of([r["memory_tokens"] for r in answered]),
        mean_full_tokens=mean_of([r["full_tokens"] for r in answered]),
        mean_retention=mean_of([r["memory_tokens"] / r["full_tokens"] for r in answered]),
        mean_seconds_per_video=mean_of(list(seconds_per_video.values())),
    )


def tally(records: Sequence[dict]) -> dict:
    """questions, correct and accuracy (percent; None for no questions) of result lines."""
    correct = sum(bool(r["correct"]) for r in records)
    return dict(questions=len(records), correct=correct,
                accuracy=100 * correct / len(records) if records else None)


def mean_of(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(summary: dict) -> str:
    lines = format_rows([("overall", summary), *((f"duration {d}", s) for d, s in summary["by_duration"].items()),
                         *((f"task {t}", s) for t, s in summary["by_task_type"].items())])
    lines.append(f"{counted(summary['videos'], 'video')}, {counted(summary['errors'], 'failed question')} "
                 "(counted wrong)")
    if summary["mean_memory_tokens"] is not None:
        lines.append(f"memory: mean {summary['mean_memory_tokens']:.0f} of {summary['mean_full_tokens']:.0f} tokens, "
                     f"retention {100 * summary['mean_retention']:.1f}%; {summary['mean_seconds_per_video']:.2f} s "
                     "per video")
    return "\n".join(lines)


def format_rows(rows: Sequence[tuple[str, dict]], title: str = "") -> list[str]:
    """A table of (name, tally) rows: questions, correct, accuracy."""
    width = max(len(name) for name, _ in [(title, None), *rows])
    lines = [f"{title:{width}}  questions  correct  accuracy"]
    for name, score in rows:
        accuracy = f"{score['accuracy']:7.1f}%" if score["accuracy"] is not None else "       -"
        lines.append(f"{name:{width}}  {score['questions']:9d}  {score['correct']:7d}  {accuracy}")
    return lines
