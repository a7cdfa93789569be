"""What a stream of N hours keeps under a config's memory bounds: the memory rule alone (memory/store.py), no
model. Each chunk of `--chunk-frames` frames brings `--tokens-per-pair` video tokens per frame pair, of which
its policy keeps `--kept` (a share; EMLoC's varies with the content); the budget's evictions, the host's
`host_budget` and `recall` are the config's. Prints, per stream length, the share of each stretch's video
tokens that its policy kept still held on the device and on the host (what a question may recall), as a
Markdown table:

    python tools/stream_horizon.py --config stream_default --hours 0.5,1,4,24 --kept 0.05,0.2
"""

from __future__ import annotations

import argparse

import torch

from memory.store import KVMemory, coverage, default_stretches
from streamer.config import load_config

LAYERS, HEADS, DIM = 4, 1, 1  # every layer thins alike (memory/store.py), so four stand for any number


def simulate(config, seconds: float, kept_share: float, tokens_per_pair: int, fps: float, seed: int = 0):
    memory_options = config.memory
    memory = KVMemory.empty(LAYERS, HEADS, DIM, "cpu", torch.float16, **memory_options.limits())
    memory.video_start = 0
    generator = torch.Generator().manual_seed(seed)
    frames = memory_options.chunk_frames
    video = frames // 2 * tokens_per_pair
    keep = max(1, round(video * kept_share))
    for _ in range(int(seconds * fps) // frames):
        start = memory.next_position
        positions = torch.arange(start, start + video)[:, None].expand(-1, 3)
        scores = [torch.rand(HEADS, video, generator=generator) for _ in range(LAYERS)]
        keeps = [s.topk(keep, dim=1).indices.sort(dim=1).values for s in scores]
        kv = torch.zeros(1, HEADS, video, DIM, dtype=torch.float16)
        memory.commit([(kv, kv)] * LAYERS, positions, torch.zeros(video, dtype=torch.bool), keeps, scores,
                      frames=frames, grid_thw=(frames // 2, 1, 1), fps=fps, video_start=0, chosen={})
    return memory


def held(memory: KVMemory, stretches, host: bool = False) -> list[float]:
    """Per stretch, the share of what its policy kept that the device (or the host) holds."""
    if host and not memory.host:
        return [0.0] * len(stretches)
    return [row["of_kept"] for row in coverage(memory, stretches, memory.host if host else None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="stream_default", help="config whose [memory] bounds to use")
    parser.add_argument("--hours", default="0.5,1,4,24", help="stream lengths in hours (default 0.5,1,4,24)")
    parser.add_argument("--kept", default="0.05,0.2", help="shares of a chunk's video tokens its policy keeps")
    parser.add_argument("--tokens-per-pair", type=int, default=144, help="video tokens per frame pair (144: "
                        "Qwen2-VL at 112,896 pixels a frame)")
    parser.add_argument("--fps", type=float, default=1.0)
    args = parser.parse_args()
    config = load_config(args.config)
    mem = config.memory
    print(f"`{args.config}`: budget {mem.budget} tokens per layer, age_power {mem.age_power}, recall {mem.recall}, "
          f"host_budget {mem.host_budget}; chunks of {mem.chunk_frames} frames at {args.fps:g} fps, "
          f"{args.tokens_per_pair} tokens per frame pair. Of what the policy kept of each stretch, the share held on the "
          "device / on the host:\n")
    for kept in (float(k) for k in args.kept.split(",")):
        print(f"| policy keeps {kept:.0%} of a chunk | first hour | quarter 2 of 4 | quarter 3 of 4 | last hour | "
              "last 10 minutes | last minute |\n|---|---|---|---|---|---|---|")
        for hours in (float(h) for h in args.hours.split(",")):
            memory = simulate(config, hours * 3600, kept, args.tokens_per_pair, args.fps)
            stretches = {label: (label, start, end) for label, start, end in default_stretches(hours * 3600)}
            chosen = [stretches[name] for name in ("first hour", "quarter 2 of 4", "quarter 3 of 4", "last hour",
                                                   "last 10 minutes", "last minute")]
            device, host = held(memory, chosen), held(memory, chosen, host=True)
            cells = [f"{d:.1%} / {h:.1%}" if memory.host else f"{d:.1%}" for d, h in zip(device, host)]
            print(f"| {hours:g} h | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
