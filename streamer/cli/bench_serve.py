"""`streamer bench-serve`: how many sessions a service accepts and how many answers it gives per second.

A load of concurrent clients, each on the built-in procedural videos (streamer.builtin.videos):
every client connects and starts a session at once (sessions accepted per second), pushes its
frames as PNG and waits until they are ingested (frames per second), then asks its questions one
after another while the others ask theirs (answers and generated tokens per second, time to first
token seen by the client). Against a running server (--url); against a server started here with
each --max-batch in turn (1: one answer at a time and one chunk at a time, the engine without batching;
otherwise chunks of up to --max-together sessions are ingested together), plus the time to
first token of a question asked alone and while another session generates a long answer; or
against Ray Serve started here with each replica count of --replicas in turn. Each setting gets the
same load after one unmeasured pass that warms it, so that one run gives the ratios.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import socket
import time
import urllib.request

import numpy as np
from websockets.exceptions import InvalidHandshake

from streamer.builtin.videos import make_video
from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.service.client import ServerError, StreamerClient
from streamer.service.protocol import ServerLimits
from streamer.service.server import serve
from streamer.service.service import StreamService
from streamer.text import counted
from video_io.images import encode_image

log = logging.getLogger("streamer")


async def accept(client: StreamerClient, options: dict | None) -> None:
    """Connect and start a session with the start `options`."""
    await client.__aenter__()
    await client.start(**(options or {}))


async def ingest(client: StreamerClient, images: list[bytes]) -> None:
    """Push a video's frames (PNG, 2 fps) and wait until the server has ingested them all."""
    for i, data in enumerate(images):
        await client.send_frame(data, ts=i * 0.5)
    await client.flush()
    await client.wait_ingested()


async def measure(url: str, sessions: int, frames: int, questions: int, max_new_tokens: int,
                  ignore_eos: bool = False, options: dict | None = None) -> dict:
    """One load; `options` go into every session's start message."""
    videos = [make_video(seed, frames) for seed in range(sessions)]
    pushed = [[encode_image(image, "PNG") for image in video.frames()] for video in videos]
    asked = [[qa.question for qa in video.questions()][:questions] for video in videos]
    clients = [StreamerClient(url) for _ in range(sessions)]
    ttfts, tokens = [], []

    async def ask(client, texts):
        for text in texts:
            answer = await client.ask(text, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
            # the server's: from the model thread starting the question to its first token, waits for a place in
            # the batch included (a random model's tokens may stream no text, so the client cannot see it)
            ttfts.append(answer["stats"]["ttft_s"])
            tokens.append(answer["stats"]["tokens"])

    try:
        started = time.perf_counter()
        await asyncio.gather(*[accept(client, options) for client in clients])
        accept_s = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*[ingest(client, images) for client, images in zip(clients, pushed)])
        ingest_s = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*[ask(client, texts) for client, texts in zip(clients, asked)])
        answer_s = time.perf_counter() - started
    finally:
        await asyncio.gather(*[client.close() for client in clients], return_exceptions=True)
    answers = sum(len(texts) for texts in asked)
    return dict(sessions=sessions, sessions_per_s=sessions / accept_s, frames_per_s=sessions * frames / ingest_s,
                answers=answers, answers_per_s=answers / answer_s, tokens_per_s=sum(tokens) / answer_s,
                mean_tokens=sum(tokens) / answers, ttft_p50_s=float(np.percentile(ttfts, 50)),
                ttft_p99_s=float(np.percentile(ttfts, 99)))


async def measure_interference(url: str, frames: int, long_tokens: int, options: dict | None = None) -> dict:
    """Time to a one-token answer (its first token) seen by the client, asked alone, then while another
    session generates a `long_tokens` answer: asked once the server's /metrics shows that answer running."""
    video = make_video(0, frames)
    images = [encode_image(image, "PNG") for image in video.frames()]
    question = video.questions()[0].question
    clients = [StreamerClient(url) for _ in range(2)]
    metrics = url.replace("ws://", "http://", 1) + "/metrics"

    async def one_token(client) -> float:
        sent = time.perf_counter()
        await client.ask(question, max_new_tokens=1)
        return time.perf_counter() - sent

    def running() -> float:
        with urllib.request.urlopen(metrics, timeout=30) as response:
            text = response.read().decode()
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("streamer:num_requests_running "))

    try:
        for client in clients:
            await accept(client, options)
            await ingest(client, images)
        alone = await one_token(clients[1])
        long = asyncio.create_task(clients[0].ask("Describe the whole video in detail.", max_new_tokens=long_tokens,
                                                  ignore_eos=True))
        while not long.done() and await asyncio.to_thread(running) < 1:
            await asyncio.sleep(0.005)
        if long.done():
            raise RuntimeError("the long answer ended before the short question could be asked beside it")
        beside = await one_token(clients[1])
        long_made = (await long)["stats"]["tokens"]
    finally:
        await asyncio.gather(*[client.close() for client in clients], return_exceptions=True)
    return dict(ttft_alone_s=alone, ttft_beside_long_s=beside, long_answer_tokens=long_made)


def serve_here(config, limits: ServerLimits, port: int) -> None:
    """`streamer serve`'s server, in a process of its own (bench-serve's server)."""
    logging.basicConfig(level=logging.WARNING)
    runner, _ = load_runner(config)
    asyncio.run(serve(StreamService(runner, config, limits), "127.0.0.1", port))


def wait_ready(port: int, process, timeout: float = 600.0) -> None:
    """Until the server's /health/ready answers 200 (a model step ran), or its process ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the benchmark's server exited with code {process.exitcode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the benchmark's server was not ready within {timeout:g} s")


def measure_batching(args, batches: list[int]) -> list[dict]:
    """The same load on a server started here (`streamer serve`'s, in its own process), once per max_batch."""
    config = load_config(args.config)
    override(config, "model", name=args.model, dtype=args.dtype, device=args.device)
    config.validate()
    options = dict(chunk_frames=args.chunk_frames)
    if args.policy:
        options["policy"] = args.policy
    if args.pixels:
        options.update(min_pixels=args.pixels, max_pixels=args.pixels)
    rows = []
    for max_batch in batches:
        limits = ServerLimits(max_sessions=args.sessions + 2, max_unstarted=args.sessions + 2, max_batch=max_batch,
                              max_together=1 if max_batch == 1 else args.max_together,
                              max_new_tokens=max(512, args.long_tokens, args.max_new_tokens))
        port = free_port()
        server = multiprocessing.get_context("spawn").Process(target=serve_here, args=(config, limits, port),
                                                              daemon=True)
        log.info("bench-serve: max_batch %d, %s of %s", max_batch, counted(args.sessions, "session"), args.model)
        server.start()
        try:
            wait_ready(port, server)
            url = f"ws://127.0.0.1:{port}"

            async def load():
                await measure(url, min(args.sessions, 2), args.frames, 1, args.max_new_tokens, options=options)
                row = await measure(url, args.sessions, args.frames, args.questions, args.max_new_tokens,
                                    args.ignore_eos, options)
                row.update(await measure_interference(url, args.frames, args.long_tokens, options))
                return row

            rows.append(dict(max_batch=max_batch, **asyncio.run(load())))
        finally:
            server.terminate()
            server.join()
    return rows


def counts(text: str, switch: str) -> list[int]:
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"{switch} {text!r}: give whole numbers separated by commas, e.g. 1,32") from None
    if min(values) < 1:
        raise ValueError(f"{switch} {text!r}: every count must be >= 1")
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_on_ray(args, replica_counts: list[int]) -> list[dict]:
    import ray
    from ray import serve

    from streamer.service.ray_serve import APP, application, start_serve, wait_until_routed

    config = load_config(args.config)
    override(config, "model", name=args.model, dtype=args.dtype)
    override(config, "memory", chunk_frames=args.chunk_frames)
    config.validate()
    limits = ServerLimits(max_sessions=args.sessions)  # one replica takes the whole load
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    start_serve("127.0.0.1", port, args.ray_address)
    most = max(replica_counts)
    cpus = ray.cluster_resources().get("CPU", 1) / most  # the same share per replica for every count
    rows = []
    try:
        for count in replica_counts:
            log.info("bench-serve: %d replica(s) of %s", count, args.model)
            serve.run(application(config, limits, count, 5.0, cpus), name=APP, route_prefix="/")
            wait_until_routed(f"http://127.0.0.1:{port}", count)
            asyncio.run(measure(url, args.sessions, args.frames, args.questions, args.max_new_tokens))  # warm-up
            row = asyncio.run(measure(url, args.sessions, args.frames, args.questions, args.max_new_tokens))
            rows.append(dict(replicas=count, cpus_per_replica=cpus, **row))
            serve.delete(APP)
    finally:
        serve.shutdown()
    return rows


def format_batching(rows: list[dict]) -> str:
    lines = ["| max batch | sessions | frames ingested / s | answers / s | generated tokens / s | tokens per answer | "
             "TTFT p50 s | TTFT p99 s | 1-token answer alone s | beside a long answer s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['sessions']} | {r['frames_per_s']:.1f} | {r['answers_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['mean_tokens']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                     f"{r['ttft_alone_s']:.3f} | {r['ttft_beside_long_s']:.3f} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines.append(f"\nmax batch {last['max_batch']} vs {first['max_batch']}: frames ingested/s x"
                     f"{last['frames_per_s'] / first['frames_per_s']:.2f}, answers/s x"
                     f"{last['answers_per_s'] / first['answers_per_s']:.2f}, tokens/s x"
                     f"{last['tokens_per_s'] / first['tokens_per_s']:.2f}; TTFT beside a "
                     f"{last['long_answer_tokens']}-token answer / alone: x"
                     f"{last['ttft_beside_long_s'] / last['ttft_alone_s']:.1f} (max batch {first['max_batch']}: x"
                     f"{first['ttft_beside_long_s'] / first['ttft_alone_s']:.1f})")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    lines = ["| replicas | sessions | sessions accepted / s | frames ingested / s | answers / s |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.get('replicas', '-')} | {row['sessions']} | {row['sessions_per_s']:.1f} | "
                     f"{row['frames_per_s']:.1f} | {row['answers_per_s']:.2f} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines.append(f"\n{last['replicas']} vs {counted(first['replicas'], 'replica')}: sessions/s x"
                     f"{last['sessions_per_s'] / first['sessions_per_s']:.2f}, frames/s x"
                     f"{last['frames_per_s'] / first['frames_per_s']:.2f}, answers/s x"
                     f"{last['answers_per_s'] / first['answers_per_s']:.2f}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        rows = measure_any(args)
    except (OSError, ServerError, InvalidHandshake, RuntimeError) as exc:  # a server that failed or stalled
        log.error("bench-serve: the measurement stopped: %s: %s", type(exc).__name__, exc or "no detail")
        return 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=vars(args) | {"run": None}, rows=rows), f, indent=1, default=str)
    return 0


def measure_any(args) -> list[dict]:
    """The rows of the measurement the switches ask for, printed as a table."""
    if args.url:
        rows = [asyncio.run(measure(args.url, args.sessions, args.frames, args.questions, args.max_new_tokens))]
        print(format_rows(rows))
    elif args.max_batch:
        rows = measure_batching(args, counts(args.max_batch, "--max-batch"))
        print(format_batching(rows))
    else:
        rows = measure_on_ray(args, counts(args.replicas, "--replicas"))
        print(format_rows(rows))
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="measure sessions accepted and answers per second of a service",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--url", help="a running server (streamer serve, with or without --ray); default: start Ray "
                                 "Serve here with each count of --replicas")
    p.add_argument("--replicas", default="1,2", help="replica counts to measure in turn (default 1,2)")
    p.add_argument("--max-batch", metavar="N,N", help="measure a server started here (no Ray) with each of these "
                                                    "max batch sizes in turn, e.g. 1,32 (1: batching off)")
    p.add_argument("--ray-address", help="a Ray cluster to use (default: $RAY_ADDRESS, else start one here)")
    p.add_argument("--max-together", type=int, default=8,
                   help="with --max-batch above 1: chunks of different sessions ingested together (default 8)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--dtype")
    p.add_argument("--config", default="stream_default")
    p.add_argument("--sessions", type=int, default=8, help="concurrent clients")
    p.add_argument("--frames", type=int, default=32, help="frames each client pushes")
    p.add_argument("--chunk-frames", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions each client asks, one after another")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--ignore-eos", action="store_true",
                   help="every answer runs to --max-new-tokens (the protocol's ignore_eos, as vLLM's benchmarks)")
    p.add_argument("--long-tokens", type=int, default=128,
                   help="with --max-batch: the long answer beside which a short question's TTFT is measured")
    p.add_argument("--device", help="with --max-batch: where the model runs")
    p.add_argument("--policy", help="with --max-batch: the sessions' memory policy (default: the config's)")
    p.add_argument("--pixels", type=int, help="with --max-batch: frame size in pixels (default: the model's)")
    p.add_argument("--out", default="bench_serve.json", help="where the JSON rows go ('' for none)")
    p.set_defaults(run=run)
