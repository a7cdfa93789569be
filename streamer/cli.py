"""`streamer` command line: ask about a video, answer from a saved memory, make a test video."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from memory.registry import POLICIES
from streamer import bench, client, demo, eval_synthetic, evaluation
from streamer.config import Config, load_config, override
from video_io.errors import VideoError

log = logging.getLogger("streamer")


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about a video file",
                       description="Read a video, build its memory chunk by chunk, answer one question.")
    p.add_argument("video", help="path of a local video file")
    p.add_argument("question")
    add_run_switches(p)
    p.add_argument("--save-memory", metavar="PATH", help="save the video's memory (.safetensors) for `streamer answer`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_ask)


def add_run_switches(p: argparse.ArgumentParser, config_default: str | None = None) -> None:
    """Switches shared by the commands that read videos into a memory (`ask`, `eval ...`)."""
    p.add_argument("--config", default=config_default,
                   help="TOML config (a path or a name in configs/); switches override it")
    p.add_argument("--model", help="builtin (default) | tiny-random | qwen2-vl-{2b,7b,72b}-random | a local checkpoint directory")
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
    p.add_argument("--ratios", type=ratio_list, help="emloc: retention ratios to try, e.g. 0.02,0.1,0.5,1.0")
    p.add_argument("--group-size", type=int, help="emloc: layers per group (1 = layer-wise)")
    p.add_argument("--ratio", type=float, help="uniform/pyramid/window/random: fraction of each chunk kept")
    p.add_argument("--probe", choices=["generic", "question"],
                   help="generic: fixed probe prompts, memory reusable for any question; question: the question "
                        "is the probe (memory specific to it)")
    p.add_argument("--budget", type=int, help="most tokens each layer's memory may hold (0 = unbounded)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")


def config_from_args(args) -> Config:
    """The config file named by --config with the run switches on top, validated."""
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
    return config.validate()


def load_runner(config: Config, device: str | None = None):
    """The configured model (on `device` if given) and a runner at the configured frame resolution;
    returns (runner, load seconds)."""
    return _load(config.model.name, device or config.model.device, config.model.dtype, config)


def ratio_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.02,0.1,1.0, got {text!r}")


def _load(name: str, device: str | None, dtype: str | None, config: Config | None = None):
    """Load a model and its runner, at the config's frame resolution if it sets one."""
    from streamer.models import load_model
    from streamer.runner import Runner

    started = time.perf_counter()
    log.info("loading model %s", name)
    loaded = load_model(name, device=device, dtype=dtype)
    seconds = time.perf_counter() - started
    log.info("model on %s (%s), loaded in %.1f s", loaded.device, loaded.dtype, seconds)
    preset = config.vision_preset(loaded.preset) if config is not None else None
    return Runner(loaded, preset), seconds


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(result["answer"])
    t = result["timings"]
    ingest = sum(t.get(key, 0.0) for key in ("vision", "prefill", "policy"))
    print(f"\n[{result['frames']} frames, memory {result['memory_tokens']:.0f} of {result['full_tokens']} tokens"
          f"{' (' + result['policy'] + ')' if 'policy' in result else ''}; ingest {ingest:.2f} s, "
          f"first token {t['question_prefill'] * 1000:.0f} ms]", file=sys.stderr)


def _run_ask(args) -> int:
    from dataclasses import asdict

    from memory.snapshot import model_identity, save_memory
    from streamer.ask import ask_video

    config = config_from_args(args)
    runner, load_s = load_runner(config)
    result, memory = ask_video(runner, args.video, args.question, config, progress=log.info)
    result["timings"] = {"load_model": load_s, **result["timings"]}
    if args.save_memory:
        save_memory(memory, args.save_memory, model_identity(runner.model, config.model.name), asdict(config))
        log.info("memory saved to %s", args.save_memory)
        result["memory_file"] = args.save_memory
    _print_result(result, args.json)
    return 0


def _add_answer(sub) -> None:
    p = sub.add_parser("answer", help="answer a question from a saved memory, without the video",
                       description="Load a memory saved by `streamer ask --save-memory` and answer a question.")
    p.add_argument("memory", help="a .safetensors memory file")
    p.add_argument("question")
    p.add_argument("--model", help="the model that made the memory (default: the one recorded in the file)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_answer)


def _run_answer(args) -> int:
    from memory.snapshot import load_memory, model_identity, read_snapshot_meta
    from streamer.ask import answer_summary, memory_summary

    name = args.model or read_snapshot_meta(args.memory)["model"]["name"]
    runner, load_s = _load(name, args.device, args.dtype)
    memory, _ = load_memory(args.memory, model_identity(runner.model, name), device=runner.device,
                            dtype=runner.model.dtype)
    answer = runner.answer(memory, args.question, args.max_new_tokens)
    timings = dict(load_model=load_s, question_prefill=answer.timings["question_prefill"],
                   decode=answer.timings["decode"])
    result = dict(answer=answer.text, question=args.question, memory_file=args.memory, model=name,
                  **memory_summary(memory), **answer_summary(answer), timings=timings)
    _print_result(result, args.json)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve live video QA over websockets",
                       description="Load the model once and serve sessions over websockets (protocol in README).")
    p.add_argument("--config", default="stream_default", help="TOML config for sessions' defaults")
    p.add_argument("--model", help="builtin | tiny-random | a built-in architecture | a local checkpoint directory")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="directory whose videos/snapshots clients may name (repeatable); none by default")
    p.add_argument("--allow-urls", action="store_true", help="let clients make the server open network streams")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"),
                   help="bearer token clients must send (default: $STREAMER_TOKEN; none = open)")
    p.add_argument("--max-sessions", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=100_000, help="frames per session")
    p.add_argument("--max-message-mb", type=float, default=8.0)
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session is closed")
    p.add_argument("--overflow", choices=["subsample", "drop"], default="subsample",
                   help="when frames arrive faster than they are ingested")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    import asyncio
    from pathlib import Path

    from streamer.server import StreamServer
    from streamer.session import ServerLimits

    config = load_config(args.config)
    override(config, "model", name=args.model, device=args.device, dtype=args.dtype)
    config.validate()
    roots = [Path(root) for root in args.allow_root]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--allow-root {root}: no such directory")
    limits = ServerLimits(max_sessions=args.max_sessions, max_frames_per_session=args.max_frames,
                          max_message_bytes=int(args.max_message_mb * 2**20), idle_timeout=args.idle_timeout,
                          overflow=args.overflow, allowed_roots=roots, allow_urls=args.allow_urls, token=args.token)
    runner, _ = load_runner(config)
    server = StreamServer(runner, config, limits, config.model.name)
    asyncio.run(server.serve(args.host, args.port))
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
    _add_answer(sub)
    _add_serve(sub)
    client.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    benchmarks = sub.add_parser("eval", help="evaluate on a benchmark", description="Evaluate on a benchmark.")
    benchmark_parsers = benchmarks.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    evaluation.add_parser(benchmark_parsers)
    eval_synthetic.add_parser(benchmark_parsers)
    _add_make_video(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is noise here
    try:
        return args.run(args)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
