"""`streamer bench-serve`: how many sessions a service accepts and how many answers it gives per second.

A load of concurrent clients, each on the built-in procedural videos (streamer.builtin.videos):
every client connects and starts a session at once (sessions accepted per second), pushes its
frames as PNG and waits until they are ingested (frames per second), then asks its questions one
after another while the others ask theirs (answers per second). Against a running server (--url),
or against Ray Serve started here with each replica count of --replicas in turn (the same load on
each, after one unmeasured pass that warms every replica), so that one run gives the ratio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

from streamer.builtin.videos import make_video
from streamer.config import load_config, override
from streamer.service.client import StreamerClient
from streamer.service.protocol import ServerLimits
from video_io.images import encode_image

log = logging.getLogger("streamer")


async def measure(url: str, sessions: int, frames: int, questions: int, max_new_tokens: int) -> dict:
    videos = [make_video(seed, frames) for seed in range(sessions)]
    pushed = [[encode_image(image, "PNG") for image in video.frames()] for video in videos]
    asked = [[qa.question for qa in video.questions()][:questions] for video in videos]
    clients = [StreamerClient(url) for _ in range(sessions)]

    async def accept(client):
        await client.__aenter__()
        await client.start()

    async def ingest(client, images):
        for i, data in enumerate(images):
            await client.send_frame(data, ts=i * 0.5)
        await client.flush()
        await client.wait_ingested()

    async def ask(client, texts):
        for text in texts:
            await client.ask(text, max_new_tokens=max_new_tokens)

    try:
        started = time.perf_counter()
        await asyncio.gather(*[accept(client) for client in clients])
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
                answers=answers, answers_per_s=answers / answer_s)


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


def format_rows(rows: list[dict]) -> str:
    lines = ["| replicas | sessions | sessions accepted / s | frames ingested / s | answers / s |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.get('replicas', '-')} | {row['sessions']} | {row['sessions_per_s']:.1f} | "
                     f"{row['frames_per_s']:.1f} | {row['answers_per_s']:.2f} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines.append(f"\n{last['replicas']} vs {first['replicas']} replicas: sessions/s x"
                     f"{last['sessions_per_s'] / first['sessions_per_s']:.2f}, frames/s x"
                     f"{last['frames_per_s'] / first['frames_per_s']:.2f}, answers/s x"
                     f"{last['answers_per_s'] / first['answers_per_s']:.2f}")
    return "\n".join(lines)


def run(args) -> int:
    if args.url:
        rows = [asyncio.run(measure(args.url, args.sessions, args.frames, args.questions, args.max_new_tokens))]
    else:
        rows = measure_on_ray(args, [int(n) for n in args.replicas.split(",")])
    print(format_rows(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=vars(args) | {"run": None}, rows=rows), f, indent=1, default=str)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="measure sessions accepted and answers per second of a service",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--url", help="a running server (streamer serve, with or without --ray); default: start Ray "
                                 "Serve here with each count of --replicas")
    p.add_argument("--replicas", default="1,2", help="replica counts to measure in turn (default 1,2)")
    p.add_argument("--ray-address", help="a Ray cluster to use (default: $RAY_ADDRESS, else start one here)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--dtype")
    p.add_argument("--config", default="stream_default")
    p.add_argument("--sessions", type=int, default=8, help="concurrent clients")
    p.add_argument("--frames", type=int, default=32, help="frames each client pushes")
    p.add_argument("--chunk-frames", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions each client asks, one after another")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", default="bench_serve.json", help="where the JSON rows go ('' for none)")
    p.set_defaults(run=run)
