"""Seconds per packed answer step (streamer.engine.generation.advance) at several batch sizes, in one process:
where decoding stops being bound by reading the weights on this machine (docs/PERFORMANCE.md).

    python tools/decode_batch_curve.py --model qwen2-vl-2b-random --batches 1,8,16,32

Each batch answers the same question over one memory (a built-in video of 16 frames at 112 x 112, `full`
policy), 4 decode steps after the questions' prefill; a markdown row per batch size. On a GPU, `--modes
eager,graphs` measures eager packed steps and the seats of streamer.engine.static_batch (one CUDA graph per
batch size) in the same run; each batch size runs once untimed first (graphs are recorded then).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from memory.registry import make_policy
from streamer.builtin.videos import make_video
from streamer.engine.generation import advance
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-vl-2b-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8,16,32", help="batch sizes, comma-separated")
    parser.add_argument("--modes", default="eager", help="eager (packed steps) and/or graphs (static seats, GPU)")
    args = parser.parse_args()
    runner = Runner(load_model(args.model, device=args.device))
    seats = runner.static_batch
    preset = replace(runner.preset, min_pixels=12544, max_pixels=12544)
    memory = ingest_video(runner, list(make_video(0, 16).frames()), make_policy("full"), 16, runner.new_memory(),
                          preset=preset)

    def step_seconds(batch: int, steps: int = 4) -> float:
        generations = [runner.begin(memory, "Describe the video.", steps + 1, stop_at_end=False, packed=True)
                       for _ in range(batch)]
        advance(runner, generations)  # the questions' prefill
        started = time.perf_counter()
        for _ in range(steps):
            advance(runner, generations)
        return (time.perf_counter() - started) / steps

    print("| steps | batch | s per step | tokens / s | vs eager batch 1 |\n|---|---:|---:|---:|---:|")
    alone = None
    for mode in args.modes.split(","):
        if mode == "graphs" and seats is None:
            print(f"| graphs | - | needs a GPU ({args.device}) | | |")
            continue
        runner.static_batch = seats if mode == "graphs" else None
        for batch in (int(b) for b in args.batches.split(",")):
            step_seconds(batch)  # warm-up (and the graphs' recording)
            seconds = step_seconds(batch)
            alone = alone or seconds
            print(f"| {mode} | {batch} | {seconds:.4f} | {batch / seconds:.1f} | x{batch * alone / seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
