"""Seconds per stage of a chunk's ingest, mean per quarter of one long generated stream: does anything grow
with the stream once the memory's budget holds it? (docs/MEMORY.md, "Cost as the stream goes on")

    python tools/stage_cost.py --videos 16 --budget 512 [--recall 256 --host-budget 1024]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from streamer.builtin.streams import make_stream
from streamer.config import load_config, override
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16, help="generated videos of 384 frames (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed (default 0)")
    parser.add_argument("--config", default="stream_default")
    parser.add_argument("--budget", type=int, default=512, help="tokens per layer (default 512: the service's, "
                                                                "scaled to the builtin)")
    parser.add_argument("--recall", type=int, default=0)
    parser.add_argument("--host-budget", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = override(load_config(args.config), "memory", budget=args.budget, recall=args.recall,
                      host_budget=args.host_budget)
    runner = Runner(load_model("builtin", device="cpu"))
    memory = runner.new_memory(**config.memory.limits())
    rows = []

    def record(number, chunk, report):
        drafts = report.chosen.get("probe_tokens", {})
        rows.append(dict(report.timings, memory_tokens=report.memory_tokens,
                         probe_answer=drafts.get("answer", 0), probe_drafted=drafts.get("drafted", 0)))

    ingest_video(runner, make_stream(args.seed, args.videos).frames(), config.make_policy(),
                 config.memory.chunk_frames, memory, on_chunk=record)
    print(f"| per chunk ({len(rows)} chunks) | quarter 1 | 2 | 3 | 4 |\n|---|---:|---:|---:|---:|")
    for name in sorted({key for row in rows for key in row} - {"read"}):
        quarters = np.array_split(np.array([row.get(name, 0.0) for row in rows], dtype=float), 4)
        print(f"| {name} | " + " | ".join(f"{q.mean():.4f}" for q in quarters) + " |")


if __name__ == "__main__":
    main()
