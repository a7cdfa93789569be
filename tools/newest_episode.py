"""Does the memory keep the present? Questions about the last generated video of a long stream, asked once the
stream's memory budget has filled (streamer.builtin.videos.long_stream), per memory setting, paired by stream.

    python tools/newest_episode.py --lengths 768,1536 --streams 20 --budget 100 \
        --runs default:stream_default,p0:stream_default:0,p2:stream_default:2,window:window,recent:recent,full:full

A run is LABEL:POLICY_OR_CONFIG[:AGE_POWER[:MAX_POSITIONS]]; a config name (configs/) brings its policy and
options, a policy name its defaults; `full` runs without a budget. Prints accuracy per run and length with a 95% bootstrap interval, and
each run's paired difference to the first run. --json writes every answer.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from streamer.builtin.videos import long_stream
from streamer.config import Config, load_config, override
from streamer.engine.runner import load_runner
from streamer.engine.stream import ingest_video


def run_config(spec: str) -> tuple[str, Config]:
    label, source, *power = spec.split(":")
    try:
        config = load_config(source)
    except FileNotFoundError:
        config = override(Config(), "memory", policy=source)
    config.memory.chunk_frames = 16
    if power and power[0]:
        config.memory.age_power = float(power[0])
    if len(power) > 1:
        config.memory.max_positions = int(power[1])
    return label, config


def bootstrap(values: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> tuple[float, float]:
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="768,1536", help="frames per stream (default: 768,1536)")
    p.add_argument("--streams", type=int, default=20, help="streams per length (default: 20)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=100, help="tokens per layer on average (default: 100)")
    p.add_argument("--runs", default="default:stream_default,window:window", help="LABEL:POLICY_OR_CONFIG[:AGE_POWER[:MAX_POSITIONS]],...")
    p.add_argument("--json", help="write every answer here")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = [run_config(spec) for spec in args.runs.split(",")]
    runner, _ = load_runner(Config())
    rows = []
    for length in [int(n) for n in args.lengths.split(",")]:
        for seed in range(args.first_seed, args.first_seed + args.streams):
            frames, questions = long_stream(seed, length)
            for label, config in runs:
                budget = None if config.memory.policy == "full" else args.budget
                memory = runner.new_memory(**{**config.memory.limits(), "budget": budget})
                ingest_video(runner, frames, config.make_policy(), config.memory.chunk_frames, memory)
                for qa in questions:
                    reply = runner.answer(memory, qa.question, 8).text.strip()
                    rows.append(dict(run=label, length=length, seed=seed, kind=qa.kind, question=qa.question,
                                     answer=qa.answer, reply=reply, correct=reply == qa.answer,
                                     memory_tokens=memory.mean_tokens()))
            print(f"length {length} stream {seed}: {len(questions)} questions", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    rng = np.random.default_rng(0)
    first = runs[0][0]
    print("| run | frames | correct | accuracy [95%] | vs " + first + " (paired) | memory tokens |")
    print("|---|---:|---:|---|---|---:|")
    for length in sorted({r["length"] for r in rows}):
        base = np.array([r["correct"] for r in rows if r["run"] == first and r["length"] == length], dtype=float)
        for label, _ in runs:
            mine = [r for r in rows if r["run"] == label and r["length"] == length]
            hits = np.array([r["correct"] for r in mine], dtype=float)
            low, high = bootstrap(hits, rng)
            diff = ""
            if label != first:
                d = hits - base
                dl, dh = bootstrap(d, rng)
                diff = f"{100 * d.mean():+.1f} [{100 * dl:+.1f}, {100 * dh:+.1f}]"
            tokens = np.mean([r["memory_tokens"] for r in mine])
            print(f"| {label} | {length} | {int(hits.sum())}/{len(hits)} | {100 * hits.mean():.1f} "
                  f"[{100 * low:.1f}, {100 * high:.1f}] | {diff} | {tokens:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
