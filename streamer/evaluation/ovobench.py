"""OVO-Bench: its annotation file, prompts and scoring, as in its repository (JoeLeelyf/OVO-Bench).

The file (`data/ovo_bench_new.json`) is a list of items. Backward-tracing (EPM, ASI, HLD) and
real-time (STU, OJR, ATR, ACR, OCR, FPD) items are multiple choice asked at `realtime` seconds,
`gt` the index of the right option. Forward-active items (REC, SSR, CRR) are asked at each of
their `test_info` times: REC "how many times so far" (answer `count`), SSR "is this step being
done now" and CRR "is there enough to answer yet" (answer Yes for `type` 1, No for 0).

Scoring follows utils/OVOBenchScore.py: multiple choice is right when the reply contains the
right letter anywhere; REC when the reply's digits, joined, are the count; SSR and CRR when the
reply is exactly "Y"/"N" or contains "Yes"/"No". A task's accuracy is over its questions (every
probe of a forward item is one), a category's the mean of its tasks', and the two overall
figures in use are the mean of the backward and real-time averages, and of all three.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from streamer.engine.benchmark_prompts import OVO_CRR_PROMPT, OVO_SSR_PROMPT, ovo_choice_prompt, ovo_count_prompt
from streamer.evaluation.results import tally
from streamer.evaluation.timed import TimedQuestion, read_list

TITLE = "OVO-Bench"
QUESTIONS = "OVO-Bench's data/ovo_bench_new.json"  # what `--questions` names
VIDEOS = "folder of its source videos (the paths in the file are relative to it)"

BACKWARD = ("EPM", "ASI", "HLD")
REALTIME = ("OCR", "ACR", "ATR", "STU", "FPD", "OJR")
FORWARD = ("REC", "SSR", "CRR")
CATEGORIES = {"backward": BACKWARD, "realtime": REALTIME, "forward": FORWARD}


def category_of(task: str) -> str:
    for category, tasks in CATEGORIES.items():
        if task in tasks:
            return category
    raise ValueError(f"unknown OVO-Bench task {task!r}; known: {', '.join(t for ts in CATEGORIES.values() for t in ts)}")


def load_questions(path: str | Path) -> list[TimedQuestion]:
    """Every question of the file, forward-active items expanded into one question per probe time."""
    items = read_list(path, "OVO-Bench's data/ovo_bench_new.json")
    questions = []
    for number, item in enumerate(items):
        try:
            questions.extend(_questions(item))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}, item {number} (id {item.get('id') if isinstance(item, dict) else '?'}): "
                             f"{exc!r} is missing or malformed") from None
    return questions


def _questions(item: dict) -> list[TimedQuestion]:
    task, video, ident = item["task"], item["video"], str(item["id"])
    category = category_of(task)
    if category != "forward":
        time = float(item["realtime"])
        return [TimedQuestion(id=ident, video=video, task=task, category=category, time=time,
                              clip_end=math.ceil(time), prompt=ovo_choice_prompt(item["question"], item["options"]),
                              answer=chr(65 + int(item["gt"])))]
    questions = []
    for index, probe in enumerate(item["test_info"]):
        if task == "REC":
            prompt, answer = ovo_count_prompt(item["activity"]), str(probe["count"])
        else:
            text = probe["step"] if task == "SSR" else item["question"]
            prompt = (OVO_SSR_PROMPT if task == "SSR" else OVO_CRR_PROMPT).format(text)
            answer = "Yes" if int(probe["type"]) == 1 else "No"
        time = float(probe["realtime"])
        questions.append(TimedQuestion(id=f"{ident}_{index}", video=video, task=task, category=category, time=time,
                                       clip_end=math.ceil(time), prompt=prompt, answer=answer))
    return questions


def score(question: TimedQuestion, reply: str) -> tuple[str | None, bool]:
    """(what the reply answers, whether OVOBenchScore counts it right)."""
    if question.task == "REC":
        digits = "".join(re.findall(r"\d+", reply))
        return digits or None, digits == question.answer
    if question.category == "forward":  # SSR, CRR
        short = {"Y": "Yes", "N": "No"}.get(reply)
        said = short or next((word for word in ("Yes", "No") if word in reply), None)
        return said, short == question.answer or question.answer in reply
    letters = re.findall(r"(?<![A-Za-z])[A-E](?![A-Za-z])", reply)
    return (letters[0] if letters else None), question.answer in reply


def summarize(records: list[dict]) -> dict:
    """Per task and category accuracy (percent) and the two overall averages; failed questions count wrong."""
    tasks = {}
    for category, names in CATEGORIES.items():
        for task in names:
            if mine := [r for r in records if r["task"] == task]:
                tasks[task] = dict(category=category, **tally(mine))
    categories = {}
    for category in CATEGORIES:
        scores = [t["accuracy"] for t in tasks.values() if t["category"] == category]
        categories[category] = sum(scores) / len(scores) if scores else None
    def mean(names):
        values = [categories[n] for n in names]
        return sum(values) / len(values) if all(v is not None for v in values) else None
    return dict(tasks=tasks, categories=categories, overall_backward_realtime=mean(["backward", "realtime"]),
                overall_all=mean(list(CATEGORIES)))


def format_table(summary: dict) -> str:
    lines = ["task  category   questions  correct  accuracy"]
    for task, row in summary["tasks"].items():
        lines.append(f"{task:4}  {row['category']:9}  {row['questions']:9d}  {row['correct']:7d}  {row['accuracy']:7.1f}%")
    for category, value in summary["categories"].items():
        if value is not None:
            lines.append(f"{category} average (mean of its tasks): {value:.1f}%")
    for name, label in (("overall_backward_realtime", "backward + real-time"), ("overall_all", "all three")):
        if summary[name] is not None:
            lines.append(f"overall, {label} (mean of category averages): {summary[name]:.1f}%")
    return "\n".join(lines)
