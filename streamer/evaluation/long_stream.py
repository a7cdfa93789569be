"""What a bounded memory still knows about a long stream's whole length (`streamer eval long-stream`).

Streams of generated videos (streamer/builtin/streams.py: the first, middle and last video are the parts
asked about) are asked about all three parts at the end, and the middle part's questions also right after it
(mid-stream: a question about now).

Each memory (LABEL:CONFIG_OR_POLICY[:KEY=VALUE,...], under `budget` tokens per layer unless it is `full` or
sets its own) streams every stream chunk by chunk. Two references run beside them: `full`, the full context without a
budget (positions re-timed past the model's limit as always), whose first answer token's distribution the
answer JS compares with; and `alone`, each part's video streamed alone through the first memory, which is
what that memory knows of the part without the rest of the stream. A memory may name its own model
(`model=DIR`): two checkpoints compared on the same streams and questions (`full` is --model's).

Per length and memory: accuracy per part with a 95% bootstrap interval over streams (each stream's
questions of a part count as one resample unit), the paired difference to the first memory per part,
memory tokens (mean per layer, on the device), the answer JS per part, and what it costs as the stream goes
on: a chunk's ingest seconds per quarter of the stream, and a question's seconds to its first answer token.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from memory.probe import js_divergence
from streamer.builtin.train import TRAIN_SEEDS
from streamer.builtin.streams import DRAWS, PARTS, SEGMENT, LongStream, make_stream
from streamer.builtin.videos import QA
from streamer.config import Config, load_config, override
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.evaluation.synthetic import bootstrap_interval

MID = "middle, then"  # the middle part's questions asked right after it
SECTION = "## Long streams"  # the section of docs/SYNTHETIC.md this evaluation writes
FULL = override(Config(), "memory", policy="full")
MEMORY_SETTINGS = ("budget", "age_power", "max_positions", "recall", "host_budget", "tier_growth", "focus")  # what a memory spec may set


@dataclass
class LongStreamConfig:
    model: str = "builtin"
    lengths: list[int] = field(default_factory=lambda: [4, 8])  # videos of SEGMENT frames per stream
    streams: int = 24  # per length; seeds first_seed ..
    first_seed: int = 0
    chunk_frames: int = 16
    # tokens per layer on average: the service's 8,192 at 144 tokens per frame pair (stream_default) holds
    # ~57 pairs whole; the builtin has 9 tokens per pair, so 512
    budget: int = 512
    memories: list[str] = field(default_factory=lambda: ["default:stream_default", "recent:recent:frames=112"])
    mid_stream: bool = True
    alone: bool = True
    bootstrap: int = 2000
    device: str = "auto"
    threads: int = 1  # per process
    workers: int = 1  # processes, each measuring whole streams

    def validate(self) -> "LongStreamConfig":
        if not self.lengths or min(self.lengths) < 3:
            raise ValueError(f"lengths are videos per stream, at least 3 (first, middle, last); got {self.lengths}")
        if self.streams < 1 or self.first_seed < 0:
            raise ValueError(f"need streams >= 1 and first_seed >= 0, got {self.streams}, {self.first_seed}")
        if (self.first_seed + self.streams) * DRAWS > TRAIN_SEEDS:
            raise ValueError(f"streams from seed {self.first_seed} on would draw training videos (seeds >= "
                             f"{TRAIN_SEEDS}); use at most {TRAIN_SEEDS // DRAWS - self.first_seed} streams")
        if self.workers < 1 or self.threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {self.workers} and {self.threads}")
        if self.chunk_frames < 2 or self.chunk_frames % 2 or SEGMENT % self.chunk_frames:
            raise ValueError(f"chunk_frames must be even and divide {SEGMENT}, got {self.chunk_frames}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 token per layer, got {self.budget}")
        if not self.memories:
            raise ValueError("give at least one memory")
        for spec in self.memories:
            memory_config(spec, self.budget, self.model)  # refuses a bad spec by name before anything runs
        return self


def memory_config(spec: str, budget: int, model: str = "builtin") -> tuple[str, Config]:
    """LABEL:CONFIG_OR_POLICY[:KEY=VALUE,...] -> (label, config) under `budget` tokens per layer (none for the
    full policy); an option named like a [memory] setting (budget, age_power, recall, ...) sets it, `model`
    the model that reads this memory (default `model`: two checkpoints compared on the same streams), the
    others go to the policy."""
    label, _, rest = spec.partition(":")
    source, _, options_text = rest.partition(":")
    if not label or not source:
        raise ValueError(f"a memory is LABEL:CONFIG_OR_POLICY[:KEY=VALUE,...], got {spec!r}")
    try:
        config = load_config(source)
    except FileNotFoundError:
        config = override(Config(), "memory", policy=source)
    options, memory = {}, {}
    for pair in filter(None, options_text.split(",")):
        key, _, value = pair.partition("=")
        (memory if key in MEMORY_SETTINGS else options)[key] = _number(value)
    override(config, "model", name=str(options.pop("model", model)))
    override(config, "memory", **{"budget": 0 if config.memory.policy == "full" else budget, **memory})
    if options:
        override(config, config.memory.policy, **options)
    config.make_policy()  # unknown policies and options are refused here, by name
    return label, config


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class Answers:
    """One memory's answers to one stream: per part, right or wrong and the first answer token's logits."""

    correct: dict[str, list[bool]] = field(default_factory=dict)
    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    memory_tokens: float = 0.0
    host_tokens: float = 0.0  # kept on the host for recall, mean per layer
    evicted: int = 0
    chunk_seconds: list[float] = field(default_factory=list)  # per chunk in stream order: its ingest's seconds
    first_token_s: dict[str, list[float]] = field(default_factory=dict)  # per part: each question's time to its
    #                                                                      first token (recall included)


def ask(runner: Runner, memory, questions: list[QA], answers: Answers, part: str) -> None:
    """Answer a part's questions (a part may have none: it is recorded all the same)."""
    correct, logits = answers.correct.setdefault(part, []), answers.logits.setdefault(part, [])
    first_token_s = answers.first_token_s.setdefault(part, [])
    for qa in questions:
        reply = runner.answer(memory, qa.question, max_new_tokens=4)
        first_token_s.append(reply.timings["question_prefill"])
        correct.append(reply.text.strip() == qa.answer)
        logits.append(reply.first_logits)


def stream_through(runner: Runner, stream: LongStream, config: Config, mid_stream: bool,
                   chunk_frames: int) -> Answers:
    answers = Answers()
    memory = runner.new_memory(**config.memory.limits())
    middle_end = (stream.parts["middle"] + 1) * SEGMENT
    frames = stream.frames()

    def timed(number, chunk, record):
        answers.chunk_seconds.append(sum(s for stage, s in record.timings.items() if stage != "read"))

    ingest_video(runner, frames[:middle_end], config.make_policy(), chunk_frames, memory, on_chunk=timed)
    if mid_stream:
        ask(runner, memory, stream.questions["middle"], answers, MID)
    ingest_video(runner, frames[middle_end:], config.make_policy(), chunk_frames, memory, on_chunk=timed)
    for part in PARTS:
        ask(runner, memory, stream.questions[part], answers, part)
    answers.memory_tokens, answers.evicted = memory.mean_tokens(), memory.evicted
    answers.host_tokens = sum(len(layer) for layer in memory.host) / len(memory.layers)
    return answers


def alone(runner: Runner, stream: LongStream, config: Config, chunk_frames: int) -> Answers:
    answers = Answers()
    for part, index in stream.parts.items():
        memory = runner.new_memory(**config.memory.limits())
        ingest_video(runner, stream.videos[index].frames(), config.make_policy(), chunk_frames, memory)
        ask(runner, memory, stream.questions[part], answers, part)
    return answers


_runners: dict[str, Runner] = {}  # this process's models, by name (a memory may name its own)


def runner_for(name: str, device: str) -> Runner:
    if name not in _runners:
        _runners[name] = Runner(load_model(name, device=device))
    return _runners[name]


def measure_stream(config: LongStreamConfig, memories: list[tuple[str, Config]], count: int,
                   seed: int) -> dict[str, Answers]:
    """One stream of `count` videos through every memory, the full context and (config.alone) each part alone."""
    torch.set_num_threads(config.threads)
    stream = make_stream(seed, count)
    runs = {}
    with torch.inference_mode():
        for label, memory in memories:
            runs[label] = stream_through(runner_for(memory.model.name, config.device), stream, memory,
                                         config.mid_stream, config.chunk_frames)
        runs["full"] = stream_through(runner_for(config.model, config.device), stream, FULL, False, config.chunk_frames)
        if config.alone:
            first = memories[0][1]
            runs["alone"] = alone(runner_for(first.model.name, config.device), stream, first, config.chunk_frames)
    return runs


def evaluate(config: LongStreamConfig, log=print) -> dict:
    """The streams are measured in `config.workers` processes (each stream whole in one of them), so the results
    equal one process's; the seconds per chunk are then measured beside the other workers."""
    config.validate()
    memories = [memory_config(spec, config.budget, config.model) for spec in config.memories]
    summary = dict(config=asdict(config), lengths={})
    started = time.perf_counter()
    seeds = range(config.first_seed, config.first_seed + config.streams)
    pool = None
    if config.workers > 1 and config.streams > 1:
        pool = ProcessPoolExecutor(min(config.workers, config.streams), mp_context=multiprocessing.get_context("spawn"))
    try:
        for count in config.lengths:
            runs: dict[str, list[Answers]] = {}
            measured = pool.map(measure_stream, repeat(config), repeat(memories), repeat(count), seeds) if pool else \
                (measure_stream(config, memories, count, seed) for seed in seeds)
            for s, result in enumerate(measured):
                for name, answers in result.items():
                    runs.setdefault(name, []).append(answers)
                log(f"{count} x {SEGMENT} frames: stream {s + 1}/{config.streams} "
                    f"({time.perf_counter() - started:.0f} s)")
            summary["lengths"][count] = summarize(runs, memories[0][0], config.bootstrap)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary["seconds"] = time.perf_counter() - started
    return summary


def summarize(runs: dict[str, list[Answers]], first: str, resamples: int) -> dict:
    """Per memory: per part, accuracy [interval], the paired difference to `first` [interval], answer JS."""
    rows = {}
    for label, answers in runs.items():
        row = dict(parts={}, memory_tokens=float(np.mean([a.memory_tokens for a in answers])) if label != "alone"
                   else None, host_tokens=float(np.mean([a.host_tokens for a in answers])))
        if label != "alone":  # is a chunk's cost, and a question's wait, flat once the budget is full?
            quarters = [np.array_split(np.array(a.chunk_seconds), 4) for a in answers]
            row["chunk_seconds"] = [float(np.mean([q[k].mean() for q in quarters])) for k in range(4)]
            row["first_token_s"] = {part: float(np.mean([s for a in answers for s in a.first_token_s.get(part, [])]))
                                    for part in (MID, PARTS[-1]) if any(a.first_token_s.get(part) for a in answers)}
        for part in (*PARTS, MID):
            if part not in answers[0].correct:  # asked of every stream or of none
                continue
            asked = [i for i, a in enumerate(answers) if a.correct[part]]  # a part may have no question
            per_stream = np.array([np.mean(answers[i].correct[part]) for i in asked])
            entry = dict(accuracy=float(per_stream.mean()), interval=bootstrap_interval(per_stream, resamples),
                         correct=int(sum(sum(a.correct[part]) for a in answers)),
                         questions=int(sum(len(a.correct[part]) for a in answers)))
            if label != first and part in runs[first][0].correct:
                base = np.array([np.mean(runs[first][i].correct[part]) for i in asked])
                entry["vs_first"] = float((per_stream - base).mean())
                entry["vs_first_interval"] = bootstrap_interval(per_stream - base, resamples)
            if part in PARTS and label != "full":
                entry["answer_js"] = float(np.mean([
                    js_divergence(f[None], m[None]) for a, ref in zip(answers, runs["full"])
                    for m, f in zip(a.logits[part], ref.logits[part])]))
            row["parts"][part] = entry
        rows[label] = row
    return dict(first=first, memories=rows)


def _percent(entry: dict) -> str:
    low, high = entry["interval"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.0f}, {100 * high:.0f}]"


def _difference(entry: dict) -> str:
    if "vs_first" not in entry:
        return ""
    low, high = entry["vs_first_interval"]
    return f"{100 * entry['vs_first']:+.1f} [{100 * low:+.0f}, {100 * high:+.0f}]"


def format_tables(summary: dict) -> str:
    lines = []
    for count, table in summary["lengths"].items():
        first = table["first"]
        lines += [f"### {count} x {SEGMENT} frames ({int(count) * SEGMENT} frames, streams of {count} videos)", "",
                  f"| memory | {' | '.join(PARTS)} | {MID} | vs {first}: {' / '.join(PARTS)} | memory tokens | "
                  f"host tokens | answer JS: {' / '.join(PARTS)} |",
                  "|---|---|---|---|---|---|---:|---:|---|"]
        for label, row in table["memories"].items():
            parts = row["parts"]
            cells = [_percent(parts[p]) for p in PARTS]
            mid = _percent(parts[MID]) if MID in parts else ""
            versus = " / ".join(_difference(parts[p]) for p in PARTS) if label != first else ""
            tokens = f"{row['memory_tokens']:.0f}" if row["memory_tokens"] is not None else ""
            host = f"{row['host_tokens']:.0f}" if row["host_tokens"] else ""
            js = " / ".join(f"{parts[p]['answer_js']:.3f}" for p in PARTS) if "answer_js" in parts["first"] else ""
            lines.append(f"| {label} | {' | '.join(cells)} | {mid} | {versus} | {tokens} | {host} | {js} |")
        questions = {p: table["memories"][first]["parts"][p]["questions"] for p in PARTS}
        lines += ["", "Questions per part: " + ", ".join(f"{p} {n}" for p, n in questions.items()) + ".", ""]
        timed = {label: row for label, row in table["memories"].items() if row.get("chunk_seconds")}
        if timed:  # (summaries written before these were measured lack them)
            lines += ["| memory | seconds per chunk, quarters 1 / 2 / 3 / 4 of the stream | seconds to the first answer "
                      f"token: {MID} / at the end |", "|---|---|---|"]
            for label, row in timed.items():
                waits = " / ".join(f"{row['first_token_s'][p]:.3f}" if p in row["first_token_s"] else "-"
                                   for p in (MID, PARTS[-1]))
                lines.append(f"| {label} | {' / '.join(f'{s:.3f}' for s in row['chunk_seconds'])} | {waits} |")
            lines.append("")
    return "\n".join(lines)


def write_section(path: Path, summary: dict, config: LongStreamConfig, command: str) -> None:
    """Put the tables under SECTION in `path`, replacing that section if it is there, keeping the rest."""
    section = "\n".join([
        SECTION, "",
        f"Produced by `{command}` on {date.today().isoformat()} ({platform.machine()} CPU with {os.cpu_count()} "
        f"cores, {config.workers} process(es) of {config.threads} thread(s), {summary['seconds'] / 60:.0f} min), "
        f"model `{config.model}`, chunks of {config.chunk_frames} frames, "
        f"budget {config.budget} tokens per layer, streams of seeds {config.first_seed}.."
        f"{config.first_seed + config.streams - 1}. " + DESCRIPTION, "",
        format_tables(summary)])
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end:] if end >= 0 else "\n")
    path.write_text(text)


DESCRIPTION = (
    "A stream is generated videos of 384 frames one after another; the first, middle and last are the parts asked "
    "about, and their objects appear in no other video. Per part: accuracy in % with a 95% bootstrap interval over "
    "streams, asked at the end of the stream (`middle, then`: the middle part's questions asked right after it); "
    "vs: the paired difference to the first memory; memory tokens: mean per layer at the end, on the device; host "
    "tokens: those kept in host memory for recall (`recall` > 0), mean per layer; answer JS: of the "
    "first answer token, from the memory vs from the full context. Cost: seconds of a chunk's ingest, mean per "
    "quarter of the stream, and seconds to a question's first answer token (recall included). `full` is the full context with no budget "
    "(positions re-timed as always); `alone` streams each part's video alone through the first memory "
    "(streamer/evaluation/long_stream.py).")

