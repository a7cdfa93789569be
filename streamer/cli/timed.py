"""`streamer eval ovobench` and `streamer eval streamingbench`: questions asked at a moment of the video."""

from __future__ import annotations

import json

from streamer.cli.switches import add_run_switches, config_from_args
from streamer.evaluation import harness, timed
from streamer.evaluation.registry import TIMED_BENCHMARKS

def add_parsers(benchmarks) -> None:
    for command, module in TIMED_BENCHMARKS.items():
        title = module.TITLE
        p = benchmarks.add_parser(
            command, help=f"{title}: each question answered at its moment of the stream",
            description=f"Answer {title}'s questions, one JSON line per question in --out (an existing --out is "
                        "resumed). Streaming mode (default): each video is read once and each question answered "
                        "against the memory when the stream reaches its time, no later frame seen; clip mode: "
                        "the video up to the question's time given afresh, as the papers evaluate. Under "
                        "torchrun, videos are shared out across the processes, one GPU each.")
        p.add_argument("--questions", required=True, help=module.QUESTIONS)
        p.add_argument("--videos", required=True, help=module.VIDEOS)
        p.add_argument("--out", default=f"{command}.jsonl", help="result lines (JSONL); questions already in it are skipped")
        p.add_argument("--mode", choices=timed.MODES, default="stream",
                       help="stream: one memory per video, questions asked as it plays (default); clip: a fresh "
                            "memory per question from the video up to its time")
        p.add_argument("--limit", type=int, help="evaluate the first N questions only (all of a video's before the next)")
        p.add_argument("--prefetch", type=int, default=1, help="videos read ahead while the model works (default 1)")
        p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
        add_run_switches(p, config_default="stream_default")
        p.set_defaults(run=run, benchmark_name=command)


def run(args) -> int:
    module = TIMED_BENCHMARKS[args.benchmark_name]
    config = config_from_args(args)
    if args.prefetch < 1:
        raise ValueError(f"--prefetch must be >= 1, got {args.prefetch}")
    questions = harness.first_questions(module.load_questions(args.questions), lambda q: q.video, args.limit)
    bench = timed.benchmark(args.benchmark_name, questions, args.videos, config, args.mode, module.score)
    records = harness.run(config, bench, args.out, depth=args.prefetch, dist=harness.Distributed.from_env(),
                          settings=dict(benchmark=args.benchmark_name, mode=args.mode))
    if records is None:  # another rank prints
        return 0
    summary = dict(benchmark=args.benchmark_name, mode=args.mode, model=config.model.name, policy=config.memory.policy,
                   config_id=harness.config_id(config, benchmark=args.benchmark_name, mode=args.mode),
                   results=args.out, **timed.run_summary(records), **module.summarize(records))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{module.TITLE}, {args.mode} mode, {summary['model']}, memory {summary['policy']}")
    print(module.format_table(summary))
    print(timed.format_run(summary))
    return 0
