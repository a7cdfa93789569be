"""`streamer make-sets`: OVO-Bench and StreamingBench files on the builtin model's procedural videos."""

from __future__ import annotations

import logging
from pathlib import Path

from streamer.builtin.sets import FIRST_SEED, FPS, write_sets
from streamer.builtin.videos import MIN_FRAMES
from streamer.engine.models import BUILTIN_CHOICE
from streamer.text import counted


def add_parser(sub) -> None:
    p = sub.add_parser("make-sets", help="write OVO-Bench and StreamingBench files on generated videos",
                       description="Write generated videos (FOLDER/videos) and questions about them in OVO-Bench's "
                                   "and StreamingBench's own formats (FOLDER/ovo_bench_new.json, "
                                   "FOLDER/questions_real.json), asked mid-stream, for `streamer eval ovobench` and "
                                   f"`streamer eval streamingbench` with --fps {FPS:g} (streamer/builtin/sets.py).")
    p.add_argument("folder", help="where to write (created)")
    p.add_argument("--videos", type=int, default=20, help="videos (default 20)")
    p.add_argument("--frames", type=int, default=384, help=f"frames per video, even, >= {MIN_FRAMES} (default 384)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"seed of the first video (default {FIRST_SEED})")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.videos < 1:
        raise ValueError(f"--videos must be >= 1, got {args.videos}")
    if args.frames % 2 or args.frames < MIN_FRAMES:
        raise ValueError(f"--frames must be even and >= {MIN_FRAMES}, got {args.frames}")
    folder = Path(args.folder)
    files = write_sets(folder, args.videos, args.frames, args.first_seed, log=logging.getLogger("streamer").info)
    print(f"wrote {counted(args.videos, 'video')} to {folder / 'videos'}, {files['ovobench']} and {files['streamingbench']}; run\n"
          f"  streamer eval ovobench --questions {files['ovobench']} --videos {folder / 'videos'} --fps {FPS:g} "
          f"--model {BUILTIN_CHOICE}\n"
          f"  streamer eval streamingbench --questions {files['streamingbench']} --videos {folder} --fps {FPS:g} "
          f"--model {BUILTIN_CHOICE}\n"
          f"({BUILTIN_CHOICE} is the builtin model taught these benchmarks' lettered answers; --model takes a "
          "checkpoint directory too)")
    return 0
