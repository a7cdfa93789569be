"""Switches shared by the commands that read videos into a memory (`ask`, `eval videomme`), and the
config they build."""

from __future__ import annotations

import argparse

from memory.registry import POLICIES, policies_with
from streamer.cli.values import ratio_list
from streamer.config import Config, load_config, override


def total_pixels(text: str) -> int | str:
    if text == "qwen-vl-utils":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count or qwen-vl-utils, got {text!r}")


def add_run_switches(p: argparse.ArgumentParser, config_default: str | None = None) -> None:
    p.add_argument("--config", default=config_default,
                   help="TOML config (a path or a name in configs/); switches override it")
    p.add_argument("--model", help="builtin (default) | builtin-choice | tiny-random | qwen2-vl-{2b,7b,72b}-random | a local checkpoint directory")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, answer with eager forwards instead of "
                   "replayed CUDA graphs (slower; for a driver or model where graphs misbehave)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=int, help="sample N frames uniformly over the video")
    sampling.add_argument("--fps", type=float, help="sample F frames per second of video time")
    p.add_argument("--max-frames", type=int, help="cap on the frame count for --fps")
    p.add_argument("--spread", choices=["centres", "linspace"],
                   help="--frames N at the centres of N equal segments (default), or linspace: first to last "
                        "frame inclusive, as qwen-vl-utils, lmms-eval and the EMLoC code take them")
    p.add_argument("--backend", choices=["pyav", "decord"], help="video decoder")
    p.add_argument("--min-pixels", type=int, help="minimum pixels per frame after resize")
    p.add_argument("--max-pixels", type=int, help="maximum pixels per frame after resize")
    p.add_argument("--total-pixels", type=total_pixels, metavar="N|qwen-vl-utils",
                   help="pixels of the whole video, shared by its frames (qwen-vl-utils' budget); qwen-vl-utils: "
                        "its defaults (128000*28*28*0.9 over frames of 128-768 x 28 x 28; 32 for Qwen3-VL)")
    p.add_argument("--chunk-frames", type=int, help="frames per prefill chunk (a multiple of 2)")
    p.add_argument("--memory", choices=list(POLICIES), help="memory policy")
    p.add_argument("--delta", type=float, help="emloc: JS divergence bound per chunk (nats)")
    p.add_argument("--ratios", type=ratio_list, help="emloc: retention ratios to try, e.g. 0.02,0.1,0.5,1.0")
    p.add_argument("--group-size", type=int, help="emloc: layers per group (1 = layer-wise)")
    p.add_argument("--ratio", type=float, help=f"{'/'.join(policies_with('ratio'))}: fraction of each chunk kept")
    p.add_argument("--recent-frames", type=int, help="recent: the newest frames the memory holds (default 4)")
    p.add_argument("--probe", choices=["generic", "question"],
                   help="generic: fixed probe prompts, memory reusable for any question; question: the question "
                        "is the probe (memory specific to it)")
    p.add_argument("--budget", type=int, help="tokens per layer on average the memory may hold, all layers together "
                   "(0 = unbounded)")
    p.add_argument("--age-power", type=float, help="under a budget, a chunk of age a keeps about c / a^P of what it "
                   "kept (default 1: every doubling of the past holds the same share; 0: all thinned alike)")
    p.add_argument("--recall", type=int, help="under a budget, keep evicted tokens in host memory and let a question "
                   "bring back this many per layer on average, of the chunks it attends to most (0 = none)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    p.add_argument("--repetition-penalty", type=float,
                   help="transformers' repetition penalty (default: the checkpoint's generation_config.json, else 1)")


def config_from_args(args) -> Config:
    """The config file named by --config with the run switches on top, validated."""
    config = load_config(args.config)
    override(config, "model", name=args.model, device=args.device, dtype=args.dtype,
             cuda_graphs=False if args.no_cuda_graphs else None)
    if args.fps is not None:  # a switch replaces the config's way of sampling, whichever it was
        config.video.frames = None
    if args.frames is not None:
        config.video.fps = None
    override(config, "video", frames=args.frames, fps=args.fps, max_frames=args.max_frames, spread=args.spread,
             backend=args.backend,
             min_pixels=args.min_pixels, max_pixels=args.max_pixels, total_pixels=args.total_pixels)
    override(config, "memory", policy=args.memory, chunk_frames=args.chunk_frames, budget=args.budget,
             age_power=args.age_power, recall=args.recall)
    override(config, "emloc", delta=args.delta, ratios=args.ratios, group_size=args.group_size)
    if args.ratio is not None:
        takes_ratio = policies_with("ratio")
        if config.memory.policy not in takes_ratio:
            raise ValueError(f"--ratio applies to {', '.join(takes_ratio)}, not {config.memory.policy}")
        override(config, config.memory.policy, ratio=args.ratio)
    if args.recent_frames is not None:
        if config.memory.policy != "recent":
            raise ValueError(f"--recent-frames applies to the recent memory, not {config.memory.policy}")
        override(config, "recent", frames=args.recent_frames)
    override(config, "probe", mode=args.probe)
    override(config, "generation", max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    return config.validate()
