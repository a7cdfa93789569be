"""`streamer demo`: the whole path on the built-in model, in one process.

Writes a procedural video (streamer.builtin.videos: coloured shapes appearing one at a time),
starts a server on a free loopback port, streams the video through the websocket client, asks
while streaming and after -- the video's own questions, whose right answers are known -- and
prints the answers against them, the memory size against the full context, the ratios chosen
per layer group and the timings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from memory.probe import GENERIC_PROMPTS
from streamer.builtin.videos import FRAME, make_video
from streamer.cli.client import ask_and_print
from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.service.client import StreamerClient, stream_frames
from streamer.service.protocol import ServerLimits
from streamer.service.server import serve
from streamer.service.service import StreamService
from streamer.text import counted
from video_io.sampling import Sampling
from video_io.sources import FileSource
from video_io.synthetic import write_video

log = logging.getLogger("streamer")


async def run_demo(args) -> int:
    config = load_config("stream_default")
    override(config, "model", name=args.model, device=args.device)
    override(config, "memory", policy=args.memory, chunk_frames=args.chunk_frames)
    override(config, "emloc", group_size=args.group_size, delta=args.delta)
    config.validate()
    synthetic = make_video(args.seed, args.frames)
    images = synthetic.frames()
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "demo.mp4"
        write_video(video, args.frames, fps=8.0, size=(FRAME, FRAME), content=images.__getitem__)
        events = ", ".join(f"{e.name} at {e.start / 8:.1f} s" for e in synthetic.events)
        model = "the server's" if args.url else config.model.name
        print(f"video: {args.frames} frames of {FRAME}x{FRAME} at 8 fps ({args.frames / 8:.0f} s): {events}\n"
              f"model {model}, memory policy {config.memory.policy}")
        if args.url:  # a running server, standalone or on Ray Serve
            await demo_session(args, config, video, synthetic, args.url)
            return 0
        runner, _ = load_runner(config)
        service = StreamService(runner, config, ServerLimits(allowed_roots=[Path(tmp)]))
        ready, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
        serving = asyncio.create_task(serve(service, "127.0.0.1", 0, ready=ready, stop=stop))
        port = await ready
        try:
            await demo_session(args, config, video, synthetic, f"ws://127.0.0.1:{port}")
        finally:
            stop.set()
            await serving
    return 0


async def demo_session(args, config, video: Path, synthetic, url: str) -> None:
    """Stream the video's frames to `url` as a client, ask while streaming and after, print the summary."""
    async with StreamerClient(url, token=args.token) as client:
        session = await client.start(policy=config.memory.policy, chunk_frames=config.memory.chunk_frames)
        print(f"session {session['session']} on {url}, {session['chunk_frames']} frames per chunk\n")
        frames = list(FileSource(video, Sampling(frames=args.frames)))
        started = time.perf_counter()
        half = len(frames) // 2
        await stream_frames(client, iter(frames[:half]), realtime=False)
        await client.flush()  # up to halfway, even if that is not a whole number of chunks
        await client.wait_ingested()
        print("halfway through the stream:")
        during = asyncio.create_task(ask_and_print(client, GENERIC_PROMPTS[0], args.max_new_tokens))
        await stream_frames(client, iter(frames[half:]), realtime=False)  # the question overtakes these
        await during
        await client.flush()
        stats = await client.wait_ingested()
        ingest_s = time.perf_counter() - started
        print("\nafter the stream:")
        right = 0
        for qa in synthetic.questions():
            answer = await ask_and_print(client, qa.question, args.max_new_tokens)
            correct = answer["text"].strip().lower().startswith(qa.answer.lower())
            right += correct
            print(f"   expected {qa.answer!r}: {'right' if correct else 'wrong'} "
                  f"({qa.kind}; chance 1 in {qa.choices})")
        print(f"{right} of {len(synthetic.questions())} right")
        progress = []
        while not client.events.empty():
            event = client.events.get_nowait()
            if event.get("type") == "progress":
                progress.append(event)
    print_summary(stats, progress, ingest_s)


def print_summary(stats: dict, progress: list[dict], ingest_s: float) -> None:
    full, kept = stats["full_tokens"], stats["memory_tokens"]
    print(f"\nmemory: {kept:.0f} tokens per layer vs {full} in the full context "
          f"({100 * kept / max(full, 1):.1f}%), {counted(stats['frames_ingested'], 'frame')} in "
          f"{counted(stats['chunks'], 'chunk')}, "
          f"{ingest_s:.1f} s to stream and ingest")
    print("chunk  frames so far  ratio per layer group (bottom to top)  JS per group          memory tokens")
    for event in progress:
        ratios = " ".join(f"{v:g}" for v in event.get("ratios") or [])
        js = " ".join(f"{v:.3f}" for v in event.get("js") or [])
        print(f"{event['chunks']:>5}  {event['frames']:>13}  {ratios:<37}  {js:<20}  {event['memory_tokens']:.0f}")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="stream a synthetic video through an in-process server and ask questions")
    p.add_argument("--model", help="default: the built-in trained model (builtin)")
    p.add_argument("--url", help="stream to this running server (streamer serve, with or without --ray) instead "
                                 "of one started here; it should serve the built-in model for the answers to hold")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"), help="bearer token for --url")
    p.add_argument("--device")
    p.add_argument("--memory", default="emloc", help="memory policy (default emloc)")
    p.add_argument("--frames", type=int, default=192, help="frames in the synthetic video (8 fps, all sent)")
    p.add_argument("--seed", type=int, default=7, help="which synthetic video")
    p.add_argument("--chunk-frames", type=int, default=32)
    p.add_argument("--group-size", type=int, help="emloc layers per group (default: configs/stream_default.toml's)")
    p.add_argument("--delta", type=float, help="emloc JS bound (default: configs/stream_default.toml's)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(run=lambda args: asyncio.run(run_demo(args)))
