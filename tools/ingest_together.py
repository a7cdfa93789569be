"""Seconds to ingest a round of chunks of N sessions one at a time and together (streamer.engine.together: their
probe forwards packed), in one process, alternating, with the chunk stages summed (docs/PERFORMANCE.md).

    python tools/ingest_together.py --model qwen2-vl-2b-random --sessions 2,4 --chunk-frames 4 --pixels 12544

Each session streams its own built-in video with the service's live default memory (configs/stream_default.toml);
its first chunk is ingested untimed, then two rounds of one chunk per session are timed, alone (one chunk after
another) and together, each `--repeats` times on fresh memories. Stage sums count, in chunks ingested together,
the time a chunk waited for the others' (so they add up to more than the round); `waited` sums those waits.
"""

from __future__ import annotations

import argparse
import time

import torch

from streamer.builtin.videos import make_video
from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.engine.together import ingest_together

STAGES = ("vision", "prefill", "probe", "search", "waited")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sessions", default="8", help="session counts, comma-separated (one table each)")
    parser.add_argument("--chunk-frames", type=int, default=8)
    parser.add_argument("--pixels", type=int, help="frame size in pixels (default: the model's)")
    parser.add_argument("--policy", help="the sessions' memory policy (default: the service's, EMLoC)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_config("stream_default")
    override(config, "model", name=args.model, device=args.device)
    if args.pixels:
        override(config, "video", min_pixels=args.pixels, max_pixels=args.pixels)
    if args.policy:
        override(config, "memory", policy=args.policy)
    runner, _ = load_runner(config)
    preset = config.vision_preset(runner.preset)
    chunk = args.chunk_frames
    for sessions in [int(n) for n in args.sessions.split(",")]:
        videos = [list(make_video(seed, max(16, 3 * chunk)).frames()) for seed in range(sessions)]
        table(runner, config, preset, videos, chunk, args.repeats, f"{args.model}, {sessions} sessions")


def table(runner, config, preset, videos: list, chunk: int, repeats: int, title: str) -> None:
    def measure(together: bool) -> tuple[float, dict]:
        sessions = [(runner.new_memory(**config.memory.limits()), config.make_policy()) for _ in videos]
        for (memory, policy), frames in zip(sessions, videos):
            runner.ingest(memory, frames[:chunk], policy, preset, fps=2.0)
        stages, seconds = dict.fromkeys(STAGES, 0.0), 0.0
        for round_ in (1, 2):
            calls = [lambda m=m, p=p, f=f: runner.ingest(m, f[round_ * chunk:(round_ + 1) * chunk], p, preset, fps=2.0)
                     for (m, p), f in zip(sessions, videos)]
            started = time.perf_counter()
            if together:
                outcomes = ingest_together(runner, calls)
                records = [record for record, error in outcomes if error is None]
                assert len(records) == len(calls), [error for _, error in outcomes]
            else:
                records = [call() for call in calls]
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            for record in records:
                for stage in STAGES:
                    stages[stage] += record.timings.get(stage, 0.0)
        return seconds, stages

    print(f"\n{title}, chunks of {chunk} frames, {runner.device}: 2 rounds")
    print("| ingest | seconds | " + " | ".join(f"{s} s (sum)" for s in STAGES) + " |")
    print("|---|---:|" + "---:|" * len(STAGES))
    totals = {False: [], True: []}
    for _ in range(repeats):
        for together in (False, True):
            seconds, stages = measure(together)
            totals[together].append(seconds)
            print(f"| {'together' if together else 'one at a time'} | {seconds:.2f} | "
                  + " | ".join(f"{stages[s]:.2f}" for s in STAGES) + " |", flush=True)
    ratios = [a / b for a, b in zip(totals[False], totals[True])]
    print(f"\ntogether vs one at a time: x{min(ratios):.2f} - x{max(ratios):.2f} the chunks per second")


if __name__ == "__main__":
    main()
