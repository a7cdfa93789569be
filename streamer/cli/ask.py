"""`streamer ask` (one video, one question: read frames, ingest them chunk by chunk, answer) and
`streamer answer` (a question to a saved memory, without the video)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from memory.policy import ProbedPolicy
from memory.snapshot import load_memory, read_snapshot_meta, save_memory
from streamer.engine.models import model_identity
from memory.store import ChunkRecord, KVMemory, coverage
from streamer.cli.switches import add_run_switches, config_from_args
from streamer.config import Config, override
from streamer.engine.runner import Answer, Runner, load_runner
from streamer.engine.stream import ingest_video
from video_io.readers import not_found
from video_io.sources import FileSource, StreamSource

log = logging.getLogger("streamer")
STAGES = ("preprocess", "vision", "prefill", "policy", "probe", "search")


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about a video file",
                       description="Read a video, build its memory chunk by chunk, answer one question.")
    p.add_argument("video", help="a local video file, or a stream URL (with --seconds or --max-frames)")
    p.add_argument("question")
    add_run_switches(p)
    p.add_argument("--seconds", type=float, help="a stream URL: read this many seconds of it, then answer")
    p.add_argument("--save-memory", metavar="PATH", help="save the video's memory (.safetensors) for `streamer answer`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_ask)

    p = sub.add_parser("answer", help="answer a question from a saved memory, without the video",
                       description="Load a memory saved by `streamer ask --save-memory` and answer a question.")
    p.add_argument("memory", help="a .safetensors memory file")
    p.add_argument("question")
    p.add_argument("--model", help="the model that made the memory (default: the one recorded in the file)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repetition-penalty", type=float,
                   help="transformers' repetition penalty (default: the checkpoint's generation_config.json, else 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_answer)


def open_video(video: str, config: Config, seconds: float | None = None) -> FileSource | StreamSource:
    """The frames `ask` reads: a local file, sampled as configured, or a stream URL read at video.fps (default
    1) for `seconds` or video.max_frames frames. Refuses what cannot work in one line, before any model loads."""
    if "://" not in video:
        if seconds is not None:
            raise ValueError("--seconds is for a stream URL; a file is read whole (cap it with --max-frames)")
        if not Path(video).exists():
            raise not_found(video)
        return FileSource(video, config.video.sampling(), backend=config.video.backend)
    if seconds is None and config.video.max_frames is None:
        raise ValueError(f"a stream URL may never end: give --seconds S or --max-frames N to read {video}")
    return StreamSource(video, fps=config.video.fps or 1.0, max_frames=config.video.max_frames, until=seconds)


def ask_video(runner: Runner, video: str, question: str, config: Config,
              progress: Callable[[str], None] | None = None, seconds: float | None = None):
    """Answer `question` about the video file or stream URL `video` (open_video); returns (result record,
    memory)."""
    started = time.perf_counter()
    policy = config.make_policy(question)
    source = open_video(video, config, seconds)
    chunk_frames = config.memory.chunk_frames
    live = isinstance(source, StreamSource)
    frames = (source.max_frames or math.ceil(seconds * source.fps)) if live else len(source)
    total_chunks = "" if live else f"/{math.ceil(frames / chunk_frames)}"

    totals = dict.fromkeys((*STAGES, "read"), 0.0)  # summed here: a stream keeps only its newest chunks' reports

    def on_chunk(number: int, chunk: list, record: ChunkRecord) -> None:
        for key in totals:
            totals[key] += record.timings.get(key, 0.0)
        if progress:
            chosen = f", ratios {' '.join(f'{r:.3g}' for r in record.ratios)}" if record.ratios else ""
            progress(f"chunk {number}{total_chunks}: {len(chunk)} frames ({chunk[0].ts:.1f}-{chunk[-1].ts:.1f} s), "
                     f"{record.tokens} tokens{chosen} -> memory {record.memory_tokens:.0f} of "
                     f"{memory.full_tokens} tokens")

    memory = runner.new_memory(**config.memory.limits())
    preset = config.video_preset(runner.preset, frames)
    fps = source.fps if live else source.sampled_fps  # Qwen2.5-VL's positions follow the frames' time
    ingest_video(runner, source, policy, chunk_frames, memory, on_chunk=on_chunk, preset=preset, fps=fps)
    answer = runner.answer(memory, question, config.generation.max_new_tokens)
    timings = dict(read_frames=totals["read"], **{key: totals[key] for key in STAGES}, question_prefill=answer.timings["question_prefill"],
                   decode=answer.timings["decode"], total=time.perf_counter() - started)
    result = dict(
        answer=answer.text, question=question, video=str(video), model=config.model.name, policy=policy.name,
        probe=policy.probe.mode if isinstance(policy, ProbedPolicy) else None,
        **memory_summary(memory), **answer_summary(answer), timings=timings,
    )
    return result, memory


def chunk_summary(record: ChunkRecord) -> dict:
    """The per-chunk fields of the public result: what the policy chose and what it cost."""
    keys = ("frames", "tokens", "ratios", "js", "kept", "evicted", "memory_tokens", "timings")
    flat = record.to_dict()
    return {key: flat[key] for key in keys if key in flat}


def memory_summary(memory: KVMemory) -> dict:
    """The public fields that describe a memory."""
    return dict(
        frames=memory.frames,
        frame_grid=list(memory.grid_hw) if memory.grid_hw else None,
        chunk_count=memory.chunk_count,
        chunks=[chunk_summary(record) for record in memory.chunks],
        full_tokens=memory.full_tokens,
        memory_tokens=memory.mean_tokens(),
        memory_tokens_per_layer=memory.tokens_per_layer(),
        budget=memory.budget,
        evicted_tokens=memory.evicted,
        coverage=coverage(memory) if memory.chunk_count else [],
        retimed_positions=memory.time_shift,
    )


def answer_summary(answer: Answer) -> dict:
    return dict(answer_tokens=len(answer.token_ids), first_token_logprobs=answer.first_token_logprobs,
                decode_tokens_per_s=answer.timings["decode_tokens_per_s"])


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(result["answer"] if result["answer"].strip() else "(an empty answer: the model ended it at once)")
    t = result["timings"]
    ingest = sum(t.get(key, 0.0) for key in ("vision", "prefill", "policy"))
    print(f"\n[{result['frames']} frames, memory {result['memory_tokens']:.0f} of {result['full_tokens']} tokens"
          f"{' (' + result['policy'] + ')' if 'policy' in result else ''}; ingest {ingest:.2f} s, "
          f"first token {t['question_prefill'] * 1000:.0f} ms]", file=sys.stderr)
    if result.get("evicted_tokens"):  # the budget has thinned the past: say what each quarter still holds
        quarters = [row for row in result["coverage"] if row["stretch"].startswith("quarter")]
        held = ", ".join(f"{row['start_s']:.0f}-{row['end_s']:.0f} s {100 * row['of_kept']:.0f}%" for row in quarters
                         if row["of_kept"] is not None)
        print(f"[held of what the policy kept, by quarter of the stream: {held}]", file=sys.stderr)


def check_destination(path: str) -> None:
    """Refuse a --save-memory path that cannot be written, before any work is spent on the video."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--save-memory {path}: is a directory; give a file name to save to")
    if not target.parent.is_dir():
        raise ValueError(f"--save-memory {path}: no folder {str(target.parent)!r}; create it first")
    if not os.access(target.parent, os.W_OK):
        raise ValueError(f"--save-memory {path}: the folder {str(target.parent)!r} is not writable")


def run_ask(args) -> int:
    config = config_from_args(args)
    if args.save_memory:
        check_destination(args.save_memory)
    if "://" in args.video and args.frames is not None:
        raise ValueError(f"--frames spreads frames over a video's length, and a stream URL has none: give --fps F "
                         f"(default 1) with --seconds or --max-frames for {args.video}")
    open_video(args.video, config, args.seconds).close()  # before the model loads (a minute for a 7B)
    runner, load_s = load_runner(config)
    result, memory = ask_video(runner, args.video, args.question, config, progress=log.info, seconds=args.seconds)
    result["timings"] = {"load_model": load_s, **result["timings"]}
    if args.save_memory:
        save_memory(memory, args.save_memory, model_identity(runner.model, runner.model_name), asdict(config))
        log.info("memory saved to %s", args.save_memory)
        result["memory_file"] = args.save_memory
    print_result(result, args.json)
    return 0


def run_answer(args) -> int:
    name = args.model or read_snapshot_meta(args.memory)["model"]["name"]
    config = override(Config(), "model", name=name, device=args.device, dtype=args.dtype)
    override(config, "generation", repetition_penalty=args.repetition_penalty).validate()
    runner, load_s = load_runner(config)
    memory, _ = load_memory(args.memory, model_identity(runner.model, runner.model_name), device=runner.device,
                            dtype=runner.model.dtype)
    answer = runner.answer(memory, args.question, args.max_new_tokens)
    timings = dict(load_model=load_s, question_prefill=answer.timings["question_prefill"],
                   decode=answer.timings["decode"])
    result = dict(answer=answer.text, question=args.question, memory_file=args.memory, model=name,
                  **memory_summary(memory), **answer_summary(answer), timings=timings)
    print_result(result, args.json)
    return 0
