"""What the default stream memory's policy costs per stream on the builtin model: seconds of vision, prefill,
probe and search summed over generated videos, the probe answer tokens drafted, and a hash of every chunk's
ratios (equal hashes: the same choices). Run it in two trees to compare builds:

    PYTHONPATH=<tree> python tools/stream_policy_cost.py --videos 4 --frames 384
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch

from memory.registry import make_policy
from streamer.builtin.videos import make_video
from streamer.config import load_config
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4, help="generated videos, seeds 0.. (default 4)")
    parser.add_argument("--frames", type=int, default=384, help="frames per video (default 384)")
    parser.add_argument("--config", default="stream_default", help="config whose emloc and probe to use")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    runner = Runner(load_model("builtin"))
    config = load_config(args.config)
    seconds = dict(vision=0.0, prefill=0.0, probe=0.0, search=0.0)
    drafted = answered = 0
    ratios = []
    for seed in range(args.videos):
        policy = make_policy("emloc", dict(config.policies["emloc"]), config.probe)
        memory = ingest_video(runner, make_video(seed, args.frames).frames(), policy, config.memory.chunk_frames)
        for chunk in memory.chunks:
            for stage in seconds:
                seconds[stage] += chunk.timings.get(stage, 0.0)
            probe = chunk.chosen.get("probe_tokens", {})
            drafted, answered = drafted + probe.get("drafted", 0), answered + probe.get("answer", 0)
            ratios.append(chunk.ratios)
    print(" ".join(f"{stage} {s:.2f} s" for stage, s in seconds.items()),
          f"| probe answer tokens drafted {drafted} of {answered}",
          f"| ratios md5 {hashlib.md5(json.dumps(ratios).encode()).hexdigest()}")


if __name__ == "__main__":
    main()
