"""StreamingBench: its question files, prompts and scoring, as in its repository (THUNLP-MT/StreamingBench).

`src/data/questions_real.json` (real-time visual understanding) and `questions_omni.json`
(omni-source; answered here from the frames alone, without audio) are lists of entries, each
`video_path` plus `questions` with `task_type`, `question`, `options` ("A. ..."), `answer` (a
letter) and `time_stamp` ("HH:MM:SS", when it is asked). `questions_sqa.json` (sequential
question answering) is a list per video of such entries, and each question's prompt carries the
video's earlier questions with their right answers, as the repository's StreamingBenchSQA does.
The proactive-output file asks for answers at a moment the model must choose, which a
question-at-a-time evaluation cannot score; it is refused.

The file has no question ids: a question's id is its place in the file ("<entry>.<question>",
for sqa "<video>.<entry>.<question>"). Scoring follows src/data/count.py: a reply is right when
its first character is the answer letter; accuracy per task type and over all questions.
"""

from __future__ import annotations

from pathlib import Path

from streamer.engine.benchmark_prompts import (STREAMINGBENCH_SQA_CONTEXT, STREAMINGBENCH_SQA_PROMPT, lettered,
                                               streamingbench_prompt)
from streamer.evaluation.results import format_rows, tally
from streamer.evaluation.timed import TimedQuestion, read_list

TITLE = "StreamingBench"
QUESTIONS = "one of StreamingBench's src/data/questions_{real,omni,sqa}.json"  # what `--questions` names
VIDEOS = "folder of its videos (found by the file's path below it, or by file name)"


def seconds(stamp: str) -> int:
    """'HH:MM:SS' (or 'MM:SS', 'SS') -> seconds."""
    return sum(int(part) * 60 ** i for i, part in enumerate(reversed(stamp.split(":"))))


def load_questions(path: str | Path) -> list[TimedQuestion]:
    data = read_list(path, "one of StreamingBench's src/data/questions_{real,omni,sqa}.json")
    try:
        if all(isinstance(video, list) for video in data):  # sqa: one list of entries per video
            return [q for v, entries in enumerate(data) for q in _sequential(entries, f"{v}.")]
        return [q for e, entry in enumerate(data) for q in _entry(entry, f"{e}.")]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: {exc!r} is missing or malformed; pass one of StreamingBench's "
                         "questions_real/omni/sqa.json") from None


def _entry(entry: dict, prefix: str) -> list[TimedQuestion]:
    questions = []
    for q, item in enumerate(entry["questions"]):
        if "ground_truth_time_stamp" in item or "options" not in item:
            raise ValueError("proactive-output questions (the model chooses when to answer) cannot be scored "
                             "one question at a time; pass questions_real, questions_omni or questions_sqa")
        time = seconds(item["time_stamp"])
        questions.append(TimedQuestion(id=f"{prefix}{q}", video=entry["video_path"], task=item["task_type"],
                                       category="", time=time, clip_end=time,
                                       prompt=streamingbench_prompt(item["question"], item["options"]),
                                       answer=item["answer"]))
    return questions


def _sequential(entries: list[dict], prefix: str) -> list[TimedQuestion]:
    questions, context = [], ""
    for e, entry in enumerate(entries):
        for q, item in enumerate(entry["questions"]):
            options = lettered(item["options"])
            time = seconds(item["time_stamp"])
            questions.append(TimedQuestion(id=f"{prefix}{e}.{q}", video=entry["video_path"], task=item["task_type"],
                                           category="", time=time, clip_end=time,
                                           prompt=STREAMINGBENCH_SQA_PROMPT.format(context, item["question"], *options),
                                           answer=item["answer"]))
            context = context or STREAMINGBENCH_SQA_CONTEXT
            context += (f"At timestamp {item['time_stamp']}, the following question and answer occurred: Question: "
                        f"{item['question']}; Options: {', '.join(options)}; Answer: {item['answer']}; ")
    return questions


def score(question: TimedQuestion, reply: str) -> tuple[str | None, bool]:
    """(the reply's first character, whether count.py counts it right)."""
    first = reply[:1] or None
    return first, first == question.answer


def summarize(records: list[dict]) -> dict:
    """Accuracy (percent) per task type and over all questions; failed questions count wrong."""
    tasks = {task: tally([r for r in records if r["task"] == task]) for task in dict.fromkeys(r["task"] for r in records)}
    return dict(tasks=tasks, overall=tally(records))


def format_table(summary: dict) -> str:
    return "\n".join(format_rows([*summary["tasks"].items(), ("overall", summary["overall"])], title="task"))
