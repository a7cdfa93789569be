"""`streamer eval videomme`: the command line of the evaluation (registered by streamer.cli)."""

from __future__ import annotations

import json
import logging

from streamer.evaluation.results import format_table

log = logging.getLogger("streamer")


def add_parser(benchmarks) -> None:
    """Register `videomme` on the subparsers of `streamer eval`."""
    from streamer.cli import add_run_switches  # streamer.cli imports this module

    v = benchmarks.add_parser(
        "videomme", help="Video-MME multiple choice, without subtitles",
        description="Answer the Video-MME questions (lmms-eval's prompt and scoring, no subtitles), one JSON line "
                    "per question in --out; an existing --out is resumed. Under torchrun, videos are shared out "
                    "across the processes, one GPU each.")
    v.add_argument("--questions", required=True, help="the Video-MME table: .parquet as published, .json or .jsonl")
    v.add_argument("--videos", required=True, help="folder of the videos, named <videoID>.mp4, .mkv or .webm")
    v.add_argument("--out", default="results.jsonl", help="result lines (JSONL); questions already in it are skipped")
    v.add_argument("--limit", type=int, help="evaluate the first N questions only (all of a video's before the next)")
    v.add_argument("--prefetch", type=int, default=1, help="videos read ahead while the model works (default 1)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_run_switches(v, config_default="videomme_emloc")
    v.set_defaults(run=run_videomme)


def run_videomme(args) -> int:
    from streamer.cli import config_from_args
    from streamer.evaluation.run import Distributed, config_id, run  # here: it loads the model code

    config = config_from_args(args)
    if args.prefetch < 1:
        raise ValueError(f"--prefetch must be >= 1, got {args.prefetch}")
    summary = run(config, args.questions, args.videos, args.out, limit=args.limit, depth=args.prefetch,
                  dist=Distributed.from_env())
    if summary is None:  # another rank prints
        return 0
    summary = dict(benchmark="videomme", model=config.model.name, policy=config.memory.policy,
                   probe=config.probe.mode, config_id=config_id(config), results=args.out, **summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"Video-MME (no subtitles), {summary['model']}, memory {summary['policy']}, probe {summary['probe']}")
        print(format_table(summary))
    return 0
