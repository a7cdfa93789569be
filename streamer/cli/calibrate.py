"""`streamer calibrate`: per-layer weights for the memory from a few of your own videos, written into a config."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from memory.probe import GENERIC_PROMPTS
from streamer.cli.ask import open_video
from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.evaluation.calibrate import (SPREAD, AnswerJS, candidate_profiles, layer_js, layer_weights, profile_js,
                                           profile_ratios, write_config)

log = logging.getLogger("streamer")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="per-layer memory weights from a few of your videos, written into a config",
        description="Measure how much each layer's memory matters to the answers on your own videos (the "
                    "answers' JS with that layer alone pruned, against the full context), then compare whole "
                    "layer profiles at the same size (the config's own, PyramidKV's at other steepness, weights "
                    "from that JS) by their answers' JS, and write a config with the one that moves them least. "
                    "The first thing to run on a new checkpoint; pass the result to ask, serve and the "
                    "evaluations with --config.")
    p.add_argument("videos", nargs="+", help="video files (3-5 typical ones are enough)")
    p.add_argument("--out", type=Path, required=True, help="the config file to write")
    p.add_argument("--config", default="stream_default", help="the config to start from (its memory, probe, "
                                                              "frames)")
    p.add_argument("--model", help="model name or checkpoint directory (default: the config's)")
    p.add_argument("--device", help="cpu | cuda | auto (default: the config's)")
    p.add_argument("--frames", type=int, default=64, help="frames read from each video, spread over it")
    p.add_argument("--ratio", type=float, default=0.02, help="what a layer keeps of each chunk when pruned alone")
    p.add_argument("--prompts", type=lambda s: [q for q in s.split(";") if q.strip()],
                   help="semicolon-separated questions like your users' (no answers needed) whose answers the "
                        "memories are compared on (default: a generic description prompt)")
    p.add_argument("--profile-ratio", type=float, default=0.05, help="the mean share of a chunk each compared "
                                                                        "profile keeps")
    p.add_argument("--spread", type=float, default=SPREAD, help="the most needed layer's weight over the least's, "
                                                                "at most")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out} exists; give another path, or --force to replace it")
    if not (0 < args.ratio < 1) or not (0 < args.profile_ratio < 1) or args.frames < 2 or args.spread < 1:
        raise ValueError(f"need 0 < --ratio < 1, 0 < --profile-ratio < 1, --frames >= 2 and --spread >= 1; got "
                         f"{args.ratio}, {args.profile_ratio}, {args.frames}, {args.spread}")
    config = load_config(args.config)
    if config.memory.policy != "emloc":
        raise ValueError(f"{args.config} uses the {config.memory.policy} memory; layer weights are emloc's: start "
                         "from an emloc config (stream_default)")
    override(config, "model", name=args.model, device=args.device)
    config.video.frames, config.video.fps, config.video.max_frames = args.frames, None, None  # spread over each
    config.validate()
    sources = [open_video(video, config) for video in args.videos]  # every file checked before the model loads
    runner, _ = load_runner(config)
    judges = []
    for number, (video, source) in enumerate(zip(args.videos, sources), start=1):
        frames = [frame.image for frame in source]
        log.info("video %d/%d: %s, %d frames", number, len(sources), video, len(frames))
        judges.append(AnswerJS(runner, frames, config.memory.chunk_frames, prompts=args.prompts or GENERIC_PROMPTS,
                               fps=source.sampled_fps))
    divergences = np.mean([layer_js(judge, config.probe, args.ratio, log.info) for judge in judges], axis=0).tolist()
    base = config.make_policy()
    candidates = candidate_profiles(base, divergences, args.spread)
    profiles = {name: profile_ratios(base, options, args.profile_ratio, runner.num_layers)
                for name, options in candidates.items()}
    scores = {name: float(js) for name, js in zip(profiles, np.mean(
        [list(profile_js(judge, config.probe, profiles, log.info).values()) for judge in judges], axis=0))}
    chosen = min(scores, key=scores.get)  # the first, the base's own, on a tie
    note = (f"streamer calibrate on {len(sources)} video(s) of {args.frames} frames, model {config.model.name}: "
            f"profile '{chosen}', answer JS {scores[chosen]:.4f} at {args.profile_ratio:g} of each chunk "
            f"(the base's {scores['base']:.4f})")
    write_config(args.config, candidates[chosen], args.out, note)
    print(json.dumps(dict(out=str(args.out), layer_js=[round(j, 5) for j in divergences],
                          layer_weights=layer_weights(divergences, args.spread),
                          profile_js={name: round(js, 5) for name, js in scores.items()}, chosen=chosen,
                          emloc=candidates[chosen])))
    print(f"wrote {args.out}: pass it with --config", file=sys.stderr)
    return 0
