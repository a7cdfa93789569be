"""`streamer bench`: what ingesting a long video and answering costs, per memory policy.

On a synthetic video at a fixed number of tokens per frame pair (VideoMME: 384 frames at
144 tokens = 27,648 video tokens) it measures, in one run and side by side: the vision tower
over all frames at once; ingest per policy (`full` = the whole video as one chunk, i.e. the
full-context prefill; `emloc` chunked with its search; `uniform` at the memory size emloc
reached); the time in prefill / probe / search; memory tokens kept; peak accelerator memory
above the weights; time to first token of a question and decode tokens/s against each memory;
and the achieved TFLOP/s from the explicit FLOP counts below. Each figure is the median of
`--repeats` runs after `--warmup` runs, with the GPU synchronised around every timed block.
With tiny-random on a CPU it is a smoke test that runs in seconds.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Callable

import torch
import transformers

from memory.probe import ProbeConfig
from memory.registry import make_policy
from streamer.config import load_config
from streamer.engine.models import VisionShape, family_of, load_model
from streamer.engine.runner import Runner, Timer
from streamer.engine.stream import ingest_video
from streamer.text import counted
from video_io.preprocess import preprocess_frames
from video_io.synthetic import demo_frame

log = logging.getLogger("streamer")
QUESTION = "Describe in detail what happens in the video, from the beginning to the end, and who is involved?"


@dataclass
class BenchOptions:
    model: str = "qwen2-vl-7b-random"
    device: str | None = None
    dtype: str | None = None
    frames: int = 384
    tokens_per_pair: int = 144
    chunk_frames: int = 64
    policies: list[str] = field(default_factory=lambda: ["full", "emloc", "uniform"])
    fixed_ratio: float | None = None  # time emloc's search-free path: every group takes this ratio
    answer_tokens: int | None = None  # greedy tokens each probe generates (None: the probe's default, 15)
    decode_tokens: int = 64
    repeats: int = 3
    warmup: int = 1


# --- FLOP counts (multiply-adds count 2) ------------------------------------------------------

def llm_prefill_flops(text_config, new: int, context: int) -> float:
    """Decoder layers for `new` tokens after `context` cached ones (causal inside the new ones)."""
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    # Qwen3-VL states head_dim, and its query width heads x head_dim need not be the hidden size
    head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads
    queries, kv = head_dim * text_config.num_attention_heads, head_dim * text_config.num_key_value_heads
    linear = 2 * new * (hidden * queries * 2 + hidden * kv * 2 + 3 * hidden * inter)  # q, o, k, v, mlp
    attention = 4 * new * (context + (new + 1) / 2) * queries  # scores and weighted sum, all query heads
    return text_config.num_hidden_layers * (linear + attention)


def vision_flops(shape: VisionShape, vision_config, grid_t: int, grid_h: int, grid_w: int) -> float:
    """Patch embedding, blocks (attention within each frame pair; windowed blocks within their window) and
    the 2x2 merger (one more per DeepStack feature); `shape`: the tower's, from its family's row."""
    patches, group = grid_t * grid_h * grid_w, grid_h * grid_w
    dim, out, mergers = shape.width, shape.out, 1 + len(shape.deepstack)
    mlp_weights = (3 if shape.gated else 2) * dim * shape.mlp
    window = group if shape.window is None else min(group, shape.window ** 2)
    attended = [group if i in shape.full_blocks else window for i in range(vision_config.depth)]
    patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    blocks = sum(2 * patches * (4 * dim * dim + mlp_weights) + 4 * patches * keys * dim for keys in attended)
    merged, wide = patches // vision_config.spatial_merge_size ** 2, dim * vision_config.spatial_merge_size ** 2
    merger = 2 * merged * (wide * wide + wide * out)
    return 2 * patches * patch_dim * dim + blocks + mergers * merger


# --- measurement ----------------------------------------------------------------------------

def frame_size(tokens_per_pair: int, block: int = 28) -> tuple[int, int]:
    """(height, width) in pixels giving exactly that many tokens of `block` x `block` pixels (patch x merge:
    28 in Qwen2-VL and Qwen2.5-VL, 32 in Qwen3-VL), closest to 16:9."""
    rows = min((r for r in range(1, tokens_per_pair + 1) if tokens_per_pair % r == 0),
               key=lambda r: abs(math.log((tokens_per_pair / r) / r / (16 / 9))))
    return block * rows, block * (tokens_per_pair // rows)


def median_run(fn: Callable, device: torch.device, repeats: int, warmup: int):
    """Median wall seconds of fn() (GPU synchronised) and the last result."""
    timer, seconds, result = Timer(device), [], None
    for i in range(warmup + repeats):
        with timer:
            result = fn()
        if i >= warmup:
            seconds.append(timer.seconds)
    return statistics.median(seconds), result


class PeakMemory:
    """Peak accelerator memory of a block above what was allocated before it (the weights)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gib = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30


def bench_policy(runner: Runner, frames, chunk_frames: int, policy_factory: Callable, opts: BenchOptions) -> dict:
    def ingest():
        return ingest_video(runner, frames, policy_factory(), chunk_frames)

    with PeakMemory(runner.device) as peak:
        seconds, memory = median_run(ingest, runner.device, opts.repeats, opts.warmup)
    stages = {key: sum(chunk.timings.get(key, 0.0) for chunk in memory.chunks)
              for key in ("preprocess", "vision", "prefill", "probe", "search", "policy")}
    ttft, decode = answer_speed(runner, memory, opts)
    eager = {}
    if runner.static_decoder is not None:  # the same answers without CUDA graphs, to show what they save
        graphs, runner.static_decoder = runner.static_decoder, None
        try:
            eager = dict(zip(("ttft_eager_s", "decode_eager_tokens_per_s"), answer_speed(runner, memory, opts)))
        finally:
            runner.static_decoder = graphs
    ingest_s = seconds - stages["preprocess"]  # frame preprocessing is CPU work a reader thread can overlap
    flops, context = 0.0, 0.0
    for chunk in memory.chunks:  # each chunk attends to the memory left by the chunks before it
        flops += llm_prefill_flops(runner.model.config.text_config, chunk.tokens, context)
        context = chunk.memory_tokens
    protected = int(torch.isinf(memory.layers[0].importance[0]).sum())  # prompt text (Qwen3-VL: frame text too)
    return dict(ingest_s=ingest_s, stages_s=stages, chunks=len(memory.chunks), memory_tokens=memory.mean_tokens(),
                full_tokens=memory.full_tokens, retention=memory.mean_tokens() / memory.full_tokens,
                video_retention=(memory.mean_tokens() - protected) / (memory.full_tokens - protected),
                prefill_tflops=flops / 1e12,
                prefill_tflop_per_s=flops / 1e12 / stages["prefill"] if stages["prefill"] else None,
                ratios=[chunk.ratios for chunk in memory.chunks], peak_gib_above_weights=peak.gib,
                chunk_probe_s=[chunk.timings.get("probe") for chunk in memory.chunks],
                chunk_search_s=[chunk.timings.get("search") for chunk in memory.chunks],
                probe_tokens=[chunk.chosen.get("probe_tokens") for chunk in memory.chunks],
                ttft_s=ttft, decode_tokens_per_s=decode, **eager)


def answer_speed(runner: Runner, memory, opts: BenchOptions) -> tuple[float, float | None]:
    """Median time to first token and decode tokens/s of a fixed-length answer."""
    replies = [runner.answer(memory, QUESTION, opts.decode_tokens, stop_at_end=False)
               for _ in range(opts.warmup + opts.repeats)][opts.warmup:]
    ttft = statistics.median(reply.timings["question_prefill"] for reply in replies)
    decode = [reply.timings["decode_tokens_per_s"] for reply in replies if reply.timings["decode_tokens_per_s"]]
    return ttft, statistics.median(decode) if decode else None


def run_bench(opts: BenchOptions) -> dict:
    loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype)
    family = family_of(loaded.model).preset
    block = family.patch_size * family.merge_size
    pixels = opts.tokens_per_pair * block * block
    preset = replace(family, min_pixels=pixels, max_pixels=pixels)
    runner = Runner(loaded, preset)
    height, width = frame_size(opts.tokens_per_pair, block)
    frames = [demo_frame(i, (width, height)) for i in range(opts.frames)]
    config = loaded.model.config
    log.info("bench: %s on %s (%s), %d frames of %dx%d, %d tokens per frame pair", opts.model, loaded.device,
             loaded.dtype, opts.frames, width, height, opts.tokens_per_pair)

    patches = preprocess_frames(frames, preset)
    with torch.inference_mode():
        vision_s, _ = median_run(partial(runner.encode_video, patches), runner.device, opts.repeats, opts.warmup)
        # the stock transformers tower on the same patches, for comparison (it loops over frame pairs)
        stock_s, _ = median_run(partial(runner.visual, patches.pixel_values.to(runner.device, runner.visual.dtype),
                                        grid_thw=torch.tensor([patches.grid_thw], device=runner.device)),
                                runner.device, opts.repeats, opts.warmup)
    results = dict(vision=dict(seconds=vision_s, stock_seconds=stock_s,
                               tflops=vision_flops(runner.vision_shape, config.vision_config, *patches.grid_thw) / 1e12))
    results["vision"]["tflop_per_s"] = results["vision"]["tflops"] / vision_s

    probe = ProbeConfig() if opts.answer_tokens is None else ProbeConfig(answer_tokens=opts.answer_tokens)
    emloc_options = {}
    if opts.fixed_ratio is not None:  # every candidate passes: one re-forward per group, no search
        emloc_options = dict(ratios=[opts.fixed_ratio, 1.0], delta=1.0)
    factories = dict(
        full=(lambda: make_policy("full"), len(frames)),  # one chunk: the full-context prefill
        emloc=(lambda: make_policy("emloc", {**_preset_emloc(), **emloc_options}, probe), opts.chunk_frames),
    )
    policies = {}
    for name in opts.policies:
        if name == "uniform":
            ratio = policies["emloc"]["video_retention"] if "emloc" in policies else 0.1
            factories["uniform"] = (lambda r=ratio: make_policy("uniform", {"ratio": r}, probe), opts.chunk_frames)
        if name not in factories:
            raise ValueError(f"bench measures full, emloc and uniform; got {name!r}")
        factory, chunk_frames = factories[name]
        log.info("bench: %s ingest (%d frames per chunk)", name, chunk_frames)
        policies[name] = bench_policy(runner, frames, chunk_frames, factory, opts)
    video_tokens = patches.num_tokens
    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else platform.processor()
        or "cpu", torch=torch.__version__, transformers=transformers.__version__, options=asdict(opts), frame_size=[width, height],
        video_tokens=video_tokens, vision=results["vision"], policies=policies,
    )


def _preset_emloc() -> dict:
    return dict(load_config("videomme_emloc").policies["emloc"])


COLUMNS = ("policy", "ingest s", "prefill s", "probe s", "search s", "memory tokens (%)", "peak GiB > weights",
           "TTFT ms", "decode tok/s", "prefill TFLOP/s")


def policy_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, r in report["policies"].items():
        stages = r["stages_s"]
        peak = f"{r['peak_gib_above_weights']:.2f}" if r["peak_gib_above_weights"] is not None else "-"
        rows.append([name, f"{r['ingest_s']:.3f}", f"{stages['prefill']:.3f}", f"{stages['probe']:.3f}",
                     f"{stages['search']:.3f}", f"{r['memory_tokens']:.0f} ({100 * r['retention']:.1f}%)", peak,
                     f"{1000 * r['ttft_s']:.1f}", _number(r["decode_tokens_per_s"], ".0f"),
                     _number(r["prefill_tflop_per_s"], ".3g")])
    return rows


def _number(value, spec: str) -> str:
    return format(value, spec) if value else "-"


def headline(report: dict) -> list[str]:
    vision, options = report["vision"], report["options"]
    lines = [f"{options['model']} on {report['device']}, {options['frames']} frames x {options['tokens_per_pair']} "
             f"tokens per pair = {report['video_tokens']} video tokens",
             f"vision tower, all frames: {vision['seconds']:.3f} s ({vision['tflops']:.3g} TFLOP, "
             f"{vision['tflop_per_s']:.3g} TFLOP/s); stock transformers tower {vision['stock_seconds']:.3f} s"]
    eager = [f"{name} TTFT {1000 * r['ttft_eager_s']:.1f} ms, decode {_number(r['decode_eager_tokens_per_s'], '.0f')} "
             "tok/s" for name, r in report["policies"].items() if "ttft_eager_s" in r]
    if eager:
        lines.append("answers without CUDA graphs: " + "; ".join(eager))
    return lines


def format_table(report: dict) -> str:
    rows = [list(COLUMNS), *policy_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    table = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([*headline(report), *table])


def targets(report: dict) -> list[tuple[str, float, str, bool]]:
    """Issue 7's H100 targets for the 7B architecture at 384 frames: (what, measured, target, met)."""
    policies, rows = report["policies"], []
    vision = report["vision"]["seconds"]
    rows.append(("vision tower s", vision, "<= 0.30", vision <= 0.30))
    if "emloc" in policies:
        emloc = policies["emloc"]
        rows.append(("emloc ingest s, search included", emloc["ingest_s"], "<= 1.0", emloc["ingest_s"] <= 1.0))
        if "full" in policies:
            ratio = emloc["ingest_s"] / policies["full"]["ingest_s"]
            rows.append(("emloc ingest / full ingest", ratio, "<= 0.6", ratio <= 0.6))
        if emloc["peak_gib_above_weights"] is not None:
            peak = emloc["peak_gib_above_weights"]
            rows.append(("emloc peak GiB above weights", peak, "<= 1.5", peak <= 1.5))
        rows.append(("TTFT ms against the emloc memory", 1000 * emloc["ttft_s"], "<= 25", emloc["ttft_s"] <= 0.025))
        decode = emloc["decode_tokens_per_s"] or 0.0
        rows.append(("decode tok/s against the emloc memory", decode, ">= 150", decode >= 150))
    return rows


def format_markdown(report: dict, command: str) -> str:
    """The report as a section of docs/PERFORMANCE.md: what ran, the table, the targets."""
    lines = [f"## {report['options']['model']} on {report['device']}, {report['date']}", "",
             f"`{command}`", "",
             f"torch {report['torch']}, transformers {report['transformers']}; median of "
             f"{counted(report['options']['repeats'], 'run')} after {report['options']['warmup']} warm-up.", ""]
    lines += [f"- {line}" for line in headline(report)] + [""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in policy_rows(report)] + [""]
    lines += ["| target | measured | goal | met |", "|---|---:|---|---|"]
    lines += [f"| {what} | {value:.3g} | {goal} | {'yes' if met else 'MISSED'} |"
              for what, value, goal, met in targets(report)]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure ingest, memory and answer speed per memory policy",
                       description=__doc__.split("\n\n")[0])
    defaults = BenchOptions()
    p.add_argument("--model", default=defaults.model,
                   help="qwen2-vl-7b-random | qwen2-vl-2b-random | tiny-random | a local checkpoint")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--frames", type=int, default=defaults.frames)
    p.add_argument("--tokens-per-pair", type=int, default=defaults.tokens_per_pair)
    p.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames)
    p.add_argument("--policies", default=",".join(defaults.policies), help="comma-separated: full,emloc,uniform")
    p.add_argument("--fixed-ratios", type=float, dest="fixed_ratio",
                   help="time emloc's search-free path: every layer group keeps this ratio")
    p.add_argument("--answer-tokens", type=int,
                   help="greedy tokens each probe generates before its recorded forward (default 15)")
    p.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--out", default="bench.json", help="where the JSON report goes")
    p.add_argument("--markdown", metavar="PATH", help="also write the report, its command and the targets as markdown")
    p.set_defaults(run=_run)


def bench_command(opts: BenchOptions) -> str:
    """The command line that reproduces `opts` (options left at their defaults are left out)."""
    defaults, words = asdict(BenchOptions()), ["streamer", "bench"]
    for name, value in asdict(opts).items():
        if value != defaults[name] and value is not None:
            flag = "--fixed-ratios" if name == "fixed_ratio" else "--" + name.replace("_", "-")
            words += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return " ".join(shlex.quote(word) for word in words)


def _run(args) -> int:
    opts = BenchOptions(model=args.model, device=args.device, dtype=args.dtype, frames=args.frames,
                        tokens_per_pair=args.tokens_per_pair, chunk_frames=args.chunk_frames,
                        policies=[p for p in args.policies.split(",") if p], fixed_ratio=args.fixed_ratio,
                        answer_tokens=args.answer_tokens,
                        decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup)
    if opts.repeats < 1 or opts.warmup < 0 or opts.frames < 2 or opts.tokens_per_pair < 1:
        raise ValueError("need --repeats >= 1, --warmup >= 0, --frames >= 2 and --tokens-per-pair >= 1")
    started = time.perf_counter()
    report = run_bench(opts)
    report["wall_s"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(report, bench_command(opts)))
    print(f"(JSON in {args.out})")
    return 0
