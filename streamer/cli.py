"""`streamer` command line: ask a question about a video, make a synthetic test video."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from memory.registry import POLICIES
from streamer.config import load_config, override
from video_io.errors import VideoError

log = logging.getLogger("streamer")


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about a video file",
                       description="Read a video, build its memory chunk by chunk, answer one question.")
    p.add_argument("video", help="path of a local video file")
    p.add_argument("question")
    p.add_argument("--config", help="TOML config (a path or a name in configs/); switches override it")
    p.add_argument("--model", help="tiny-random | qwen2-vl-{2b,7b,72b}-random | a local checkpoint directory")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=int, help="sample N frames uniformly over the video")
    sampling.add_argument("--fps", type=float, help="sample F frames per second of video time")
    p.add_argument("--max-frames", type=int, help="cap on the frame count for --fps")
    p.add_argument("--backend", choices=["pyav", "decord"], help="video decoder")
    p.add_argument("--min-pixels", type=int, help="minimum pixels per frame after resize")
    p.add_argument("--max-pixels", type=int, help="maximum pixels per frame after resize")
    p.add_argument("--chunk-frames", type=int, help="frames per prefill chunk (a multiple of 2)")
    p.add_argument("--memory", choices=list(POLICIES), help="memory policy")
    p.add_argument("--delta", type=float, help="emloc: JS divergence bound per chunk (nats)")
    p.add_argument("--ratios", type=_ratio_list, help="emloc: retention ratios to try, e.g. 0.02,0.1,0.5,1.0")
    p.add_argument("--group-size", type=int, help="emloc: layers per group (1 = layer-wise)")
    p.add_argument("--ratio", type=float, help="uniform/pyramid/window/random: fraction of each chunk kept")
    p.add_argument("--probe", choices=["generic", "question"],
                   help="generic: fixed probe prompts, memory reusable for any question; question: the question "
                        "is the probe (memory specific to it)")
    p.add_argument("--budget", type=int, help="most tokens each layer's memory may hold (0 = unbounded)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_ask)


def _ratio_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.02,0.1,1.0, got {text!r}")


def _run_ask(args) -> int:
    from streamer.models import load_model
    from streamer.runner import Runner
    from streamer.ask import ask_video
    from video_io.preprocess import VisionPreset

    config = load_config(args.config)
    override(config, "model", name=args.model, device=args.device, dtype=args.dtype)
    if args.fps is not None:
        config.video.frames = None
    override(config, "video", frames=args.frames, fps=args.fps, max_frames=args.max_frames, backend=args.backend,
             min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    override(config, "memory", policy=args.memory, chunk_frames=args.chunk_frames, budget=args.budget)
    override(config, "emloc", delta=args.delta, ratios=args.ratios, group_size=args.group_size)
    if args.ratio is not None:
        if config.memory.policy not in ("uniform", "pyramid", "window", "random"):
            raise ValueError(f"--ratio applies to uniform, pyramid, window and random, not {config.memory.policy}")
        override(config, config.memory.policy, ratio=args.ratio)
    override(config, "probe", mode=args.probe)
    override(config, "generation", max_new_tokens=args.max_new_tokens)
    config.validate()

    started = time.perf_counter()
    log.info("loading model %s", config.model.name)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    load_s = time.perf_counter() - started
    runner = Runner(loaded, VisionPreset(min_pixels=config.video.min_pixels, max_pixels=config.video.max_pixels))
    log.info("model on %s (%s), loaded in %.1f s", loaded.device, loaded.dtype, load_s)
    result, _ = ask_video(runner, args.video, args.question, config, progress=log.info)
    result["timings"] = {"load_model": load_s, **result["timings"]}

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["answer"])
        t = result["timings"]
        print(f"\n[{result['frames']} frames, memory {result['memory_tokens']:.0f} of {result['full_tokens']} tokens "
              f"({result['policy']}); ingest {t['vision'] + t['prefill'] + t['policy']:.2f} s, "
              f"first token {t['question_prefill'] * 1000:.0f} ms]", file=sys.stderr)
    return 0


def _add_make_video(sub) -> None:
    p = sub.add_parser("make-video", help="write a small synthetic test video (frame index coded in the pixels)")
    p.add_argument("output", help="path of the .mp4 to write")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", default="112x112", help="WIDTHxHEIGHT, even numbers")
    p.set_defaults(run=_run_make_video)


def _run_make_video(args) -> int:
    from functools import partial

    from video_io.synthetic import demo_frame, write_video

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 112x112 (WIDTHxHEIGHT), got {args.size!r}") from None
    size = (width, height)
    write_video(args.output, args.frames, fps=args.fps, size=size, content=partial(demo_frame, size=size))
    print(f"wrote {args.output}: {args.frames} frames of {width}x{height} at {args.fps:g} fps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ask(sub)
    _add_make_video(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.run(args)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
