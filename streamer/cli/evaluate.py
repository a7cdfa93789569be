"""`streamer eval videomme`, `synthetic` and `long-stream`: the command lines of the evaluations."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from streamer.cli import timed
from streamer.cli.switches import add_run_switches, config_from_args
from streamer.engine.models import BUILTIN_CHOICE
from streamer.evaluation import long_stream, synthetic
from streamer.evaluation.answers import DEFAULT_SCORING, SCORING
from streamer.evaluation.results import format_table
from streamer.evaluation.harness import Distributed, config_id
from streamer.evaluation.videomme import run

log = logging.getLogger("streamer")


def add_parser(sub) -> None:
    benchmarks = sub.add_parser("eval", help="evaluate on a benchmark", description="Evaluate on a benchmark.")
    benchmark_parsers = benchmarks.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_videomme(benchmark_parsers)
    add_synthetic(benchmark_parsers)
    add_long_stream(benchmark_parsers)
    timed.add_parsers(benchmark_parsers)


def add_videomme(benchmarks) -> None:
    v = benchmarks.add_parser(
        "videomme", help="Video-MME multiple choice, without subtitles",
        description="Answer the Video-MME questions (lmms-eval's prompt, no subtitles; lmms-eval's scoring by "
                    "default), one JSON line per question in --out; an existing --out is resumed. Under torchrun, "
                    "videos are shared out across the processes, one GPU each.")
    v.add_argument("--questions", required=True, help="the Video-MME table: .parquet as published, .json or .jsonl")
    v.add_argument("--videos", required=True, help="folder of the videos, named <videoID>.mp4, .mkv or .webm")
    v.add_argument("--out", default="results.jsonl", help="result lines (JSONL); questions already in it are skipped")
    v.add_argument("--limit", type=int, help="evaluate the first N questions only (all of a video's before the next)")
    v.add_argument("--prefetch", type=int, default=1, help="videos read ahead while the model works (default 1)")
    v.add_argument("--scoring", choices=list(SCORING), default=DEFAULT_SCORING,
                   help="how a reply is read as a letter: lmms-eval's extractor (default), the rule of its Video-MME "
                        "task before April 2026 (lmms-eval-legacy), or this project's (strict); lines already in "
                        "--out are scored again from their replies")
    v.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_run_switches(v, config_default="videomme_emloc")
    v.set_defaults(run=run_videomme)


def run_videomme(args) -> int:
    """0 when questions were answered; 1 when none could be (every video missing or failing: the table says 0%
    of nothing)."""
    config = config_from_args(args)
    if args.prefetch < 1:
        raise ValueError(f"--prefetch must be >= 1, got {args.prefetch}")
    if config.model.name == "builtin":
        log.warning("the builtin model answers its own videos' questions in words; Video-MME wants a letter: "
                    "--model %s is the built-in model trained to answer multiple choice with one", BUILTIN_CHOICE)
    summary = run(config, args.questions, args.videos, args.out, limit=args.limit, depth=args.prefetch,
                  dist=Distributed.from_env(), scoring=args.scoring)
    if summary is None:  # another rank prints
        return 0
    summary = dict(benchmark="videomme", model=config.model.name, policy=config.memory.policy,
                   probe=config.probe.mode, config_id=config_id(config), results=args.out, **summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"Video-MME (no subtitles), {summary['model']}, memory {summary['policy']}, probe {summary['probe']}, "
              f"scoring {summary['scoring']}")
        print(format_table(summary))
    if summary["questions"] and summary["errors"] == summary["questions"]:
        print(f"streamer eval videomme: error: none of the {summary['questions']} questions could be answered "
              f"(see the error of each line in {args.out}; are the videos in {args.videos}?)", file=sys.stderr)
        return 1
    return 0


def _numbers(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def add_synthetic(benchmarks) -> None:
    p = benchmarks.add_parser(
        "synthetic", help="held-out procedural videos: what each memory policy keeps of what the questions need",
        description="Accuracy (with bootstrap intervals), answer JS to the full context, and the paired difference "
                    "to uniform pruning at the same memory, per policy and video length, on generated videos.")
    defaults = synthetic.EvalConfig()
    p.add_argument("--model", default=defaults.model, help="built-in name or checkpoint (default: %(default)s)")
    p.add_argument("--lengths", type=_numbers(int), default=defaults.lengths, help="frames per video, e.g. 96,192,384")
    p.add_argument("--videos", type=int, default=defaults.videos, help="videos per length (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a quick look: 384 frames only, 20 videos, no layer ablation")
    p.add_argument("--first-seed", type=int, default=defaults.first_seed)
    p.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames)
    p.add_argument("--policies", type=lambda s: [p for p in s.split(",") if p], default=defaults.policies,
                   help="comma-separated, NAME or NAME:CONFIG (options from a TOML config); full, the uniform "
                        "sweep and the oracles always run; emloc before pyramid/window (default: %(default)s)")
    p.add_argument("--uniform-ratios", type=_numbers(float), default=defaults.uniform_ratios,
                   help="the uniform sweep that every policy is compared with at equal memory")
    p.add_argument("--oracle-extra", type=_numbers(int), default=defaults.oracle_extra,
                   help="oracle rows: the events' tokens plus k probe-ranked tokens per chunk, e.g. 0,2 (empty: none)")
    p.add_argument("--ablate-layers", type=float, default=defaults.ablate_layers, metavar="RATIO",
                   help="at the longest length, prune each layer alone to RATIO, the others whole (0: skip; "
                        "default: %(default)s)")
    p.add_argument("--delta", type=float, default=defaults.delta, help="emloc JS bound (default: %(default)s)")
    p.add_argument("--ratios", type=_numbers(float), default=defaults.ratios, help="emloc ratios")
    p.add_argument("--group-size", type=int, default=defaults.group_size, help="emloc layers per group")
    p.add_argument("--probe", choices=["generic", "question"], default=defaults.probe)
    p.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="resamples per interval")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="CPU threads per process (default: %(default)s)")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="processes, each measuring every policy on its share of the videos (default: %(default)s)")
    p.add_argument("--write", type=Path, help="also write the tables to this Markdown file (e.g. docs/SYNTHETIC.md)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(run=run_synthetic)


def run_synthetic(args) -> int:
    lengths, videos = ([384], 20) if args.quick else (args.lengths, args.videos)
    config = synthetic.EvalConfig(model=args.model, lengths=lengths, videos=videos, first_seed=args.first_seed,
                                  chunk_frames=args.chunk_frames, policies=args.policies,
                                  uniform_ratios=args.uniform_ratios, oracle_extra=args.oracle_extra,
                                  ablate_layers=0.0 if args.quick else args.ablate_layers,
                                  delta=args.delta, ratios=args.ratios, group_size=args.group_size, probe=args.probe,
                                  bootstrap=args.bootstrap, device=args.device, threads=args.threads,
                                  workers=args.workers)
    summary = synthetic.evaluate(config, log=lambda line: print(line, file=sys.stderr))
    return report(args, "synthetic", summary, synthetic.format_tables(summary),
                  lambda path, command: synthetic.write_markdown(path, summary, config, command))


def report(args, benchmark: str, summary: dict, tables: str, write) -> int:
    """Print the tables; with --write, write(path, command) puts them into Markdown; --json the summary."""
    print(tables)
    argv = sys.argv[sys.argv.index(benchmark) + 1:] if benchmark in sys.argv else []
    command = f"streamer eval {benchmark} " + shlex.join(argv)
    if args.write:
        write(args.write, command)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(command=command, **summary), indent=2) + "\n")
    return 0


def add_long_stream(benchmarks) -> None:
    p = benchmarks.add_parser(
        "long-stream", help="streams of 4-16 generated videos: what a bounded memory knows of the first, middle "
                            "and last part",
        description="Accuracy per part of long generated streams (with bootstrap intervals), the paired difference "
                    "to the first memory, memory tokens and answer JS to the full context, per memory and length.")
    defaults = long_stream.LongStreamConfig()
    p.add_argument("--model", default=defaults.model, help="built-in name or checkpoint (default: %(default)s)")
    p.add_argument("--lengths", type=_numbers(int), default=defaults.lengths,
                   help=f"videos of {long_stream.SEGMENT} frames per stream, at least 3 (default: 4,8)")
    p.add_argument("--streams", type=int, default=defaults.streams, help="streams per length (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=defaults.first_seed)
    p.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames, help="(default: %(default)s)")
    p.add_argument("--budget", type=int, default=defaults.budget,
                   help="tokens per layer on average (default: %(default)s, the service's 8,192 scaled to the "
                        "builtin's 9 tokens per frame pair)")
    p.add_argument("--memories", type=lambda s: [m for m in s.split(";") if m], default=defaults.memories,
                   help="semicolon-separated LABEL:CONFIG_OR_POLICY[:KEY=VALUE,...] (keys: memory settings such as "
                        "budget, recall, tier_growth; model=DIR to read it with another checkpoint; the policy's "
                        "options); the first is what the others are compared with and what `alone` uses (default: "
                        "%(default)s)")
    p.add_argument("--no-mid-stream", action="store_true", help="skip the middle part's questions asked right "
                                                                "after it")
    p.add_argument("--no-alone", action="store_true", help="skip each part's video streamed alone")
    p.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="resamples per interval")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads per process (default: "
                                                                          "%(default)s)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="processes, each measuring whole streams "
                   "(default: %(default)s; results equal one process's)")
    p.add_argument("--write", type=Path, help="also put the tables into this Markdown file's long-stream section "
                                              "(e.g. docs/SYNTHETIC.md)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(run=run_long_stream)


def run_long_stream(args) -> int:
    config = long_stream.LongStreamConfig(
        model=args.model, lengths=args.lengths, streams=args.streams, first_seed=args.first_seed,
        chunk_frames=args.chunk_frames, budget=args.budget, memories=args.memories,
        mid_stream=not args.no_mid_stream, alone=not args.no_alone, bootstrap=args.bootstrap, device=args.device,
        threads=args.threads, workers=args.workers)
    summary = long_stream.evaluate(config, log=lambda line: print(line, file=sys.stderr))
    return report(args, "long-stream", summary, long_stream.format_tables(summary),
                  lambda path, command: long_stream.write_section(path, summary, config, command))
