"""`streamer eval videomme` and `streamer eval synthetic`: the command lines of the evaluations."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from streamer.cli import timed
from streamer.cli.switches import add_run_switches, config_from_args
from streamer.engine.models import BUILTIN_CHOICE
from streamer.evaluation import synthetic
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
    print(synthetic.format_tables(summary))
    argv = sys.argv[sys.argv.index("synthetic") + 1:] if "synthetic" in sys.argv else []
    command = "streamer eval synthetic " + shlex.join(argv)
    if args.write:
        synthetic.write_markdown(args.write, summary, config, command)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(command=command, **summary), indent=2) + "\n")
    return 0
