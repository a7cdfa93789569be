"""The service under abuse, over loopback: sessions that come and go at random moments (before start,
mid-ingest, mid-answer) leave the server's threads, file descriptors and memory where they were.

Short by default; a longer run: LOAD_CHURN=200 LOAD_SESSIONS=64 python -m pytest tests/test_load.py
(LOAD_SESSIONS also sizes tests/test_server.py's concurrent-sessions test).
"""

import asyncio
import gc
import json
import os
import random
import threading
import time

import numpy as np
import pytest

from conftest import random_frames
from test_server import jpeg_claiming, png_claiming, push, running_server, wait_until
from websockets.asyncio.client import connect

from streamer.service.client import ServerError, StreamerClient
from streamer.service.protocol import ServerLimits
from streamer.service.session import StreamSession
from video_io.images import encode_image
from video_io.synthetic import write_video

pytestmark = pytest.mark.slow

CHURN = int(os.environ.get("LOAD_CHURN", "40"))


def footprint() -> dict:
    """Resident memory (MB), threads other than the event loop's worker pool, open file descriptors."""
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    threads = [t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")]
    return dict(rss_mb=rss, threads=sorted(threads), fds=len(os.listdir("/proc/self/fd")))


async def one_client(url: str, behaviour: str, seed: int) -> str:
    if behaviour == "before_start":
        async with connect(url) as ws:
            await ws.send(json.dumps(dict(type="ping")))
            await ws.recv()
        return behaviour
    client = await StreamerClient(url).__aenter__()
    try:
        await client.start(chunk_frames=2)
        await push(client, random_frames(6, seed=seed))
        if behaviour == "mid_ingest":
            return behaviour
        await client.flush()
        await client.wait_ingested()
        if behaviour == "mid_answer":
            await client.connection.send(json.dumps(dict(type="ask", id="q", question="What happens?")))
            return behaviour
        answer = await client.ask("What happens?", max_new_tokens=3)
        assert answer["type"] == "answer"
        return behaviour
    except ServerError as exc:  # e.g. too_many_sessions while others leave: refused cleanly, not dropped
        assert exc.code in ("too_many_sessions", "too_many_connections"), exc
        return exc.code
    finally:
        await client.close()


def test_sessions_coming_and_going_leave_no_trace(tiny_runner):
    behaviours = ["before_start", "mid_ingest", "mid_answer", "answered"]
    rng = random.Random(0)
    plan = [(rng.choice(behaviours), seed) for seed in range(CHURN)]

    async def wave(url, clients):
        return await asyncio.gather(*[one_client(url, b, s) for b, s in clients])

    limits = ServerLimits(max_sessions=8, max_unstarted=8)
    with running_server(tiny_runner, limits) as (server, url):
        asyncio.run(wave(url, plan[:8]))  # warm-up: lazy allocations and worker threads exist from here on
        wait_until(lambda: server.sessions == {} and server.unstarted == 0, timeout=60)
        gc.collect()
        before = footprint()
        started = time.monotonic()
        outcomes = []
        for start in range(0, len(plan), 8):
            outcomes += asyncio.run(wave(url, plan[start:start + 8]))
        wait_until(lambda: server.sessions == {} and server.unstarted == 0, timeout=60)
        wait_until(lambda: not any(t.name.startswith("reader-") for t in threading.enumerate()), timeout=30)
        gc.collect()
        after = footprint()
        seconds = time.monotonic() - started
    assert set(outcomes) <= {*behaviours, "too_many_sessions", "too_many_connections"}
    assert sum(outcome in behaviours for outcome in outcomes) >= len(plan) // 2, outcomes
    assert after["threads"] == before["threads"], (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["rss_mb"] < before["rss_mb"] + 150, (before, after, f"{seconds:.0f} s")


def test_a_runaway_fps_is_bounded_and_its_reader_stops(tiny_runner, tmp_path):
    write_video(tmp_path / "clip.mp4", 24, fps=8.0, size=(112, 56))

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            started = time.monotonic()
            await client.ingest("clip.mp4", fps=1e9, max_frames=4)
            done = await client.next_event("ingest_done", timeout=30)
            return done, time.monotonic() - started

    with running_server(tiny_runner, ServerLimits(allowed_roots=[tmp_path])) as (server, url):
        done, seconds = asyncio.run(scenario(url))
        wait_until(lambda: server.sessions == {})
        wait_until(lambda: not any(t.name.startswith("reader-") for t in threading.enumerate()), timeout=30)
    assert done["frames_read"] == 4 and seconds < 20


def test_large_frames_and_image_bombs_leave_memory_bounded(tiny_runner):
    large = encode_image(np.zeros((4000, 4000, 3), np.uint8), "PNG")  # 16 MP: within the pixel limit
    huge = encode_image(np.zeros((8000, 8000, 3), np.uint8), "PNG")  # 64 MP: over it, refused from the header

    async def attack(url):
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(dict(type="start")))
            await ws.recv()
            for payload in [png_claiming(60000, 60000), jpeg_claiming(60000, 60000), huge, huge, large, large]:
                await ws.send(payload)
            await ws.send(json.dumps(dict(type="stats")))
            codes = []
            while (reply := json.loads(await ws.recv()))["type"] != "stats":
                codes.append(reply.get("code"))
            return codes, reply

    with running_server(tiny_runner, ServerLimits(max_message_bytes=8 * 2**20)) as (server, url):
        gc.collect()
        before = footprint()["rss_mb"]
        codes, stats = asyncio.run(attack(url))
        peak = footprint()["rss_mb"]
        # the session leaves the table first, then closes and gives the heap back
        wait_until(lambda: footprint()["rss_mb"] < before + 40, timeout=30)
    assert codes == ["bad_image"] * 4
    assert stats["frames_received"] == 2  # the 4000 x 4000 frames, held at model resolution
    assert peak < before + 1000, (before, peak)


def test_messages_over_twice_the_limit_close_with_1009(tiny_runner):
    async def scenario(url):
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(dict(type="start")))
            await ws.recv()
            await ws.send(b"x" * 150_000)  # over the limit, under twice it: an error, the connection goes on
            refused = json.loads(await ws.recv())
            await ws.send(b"x" * 250_000)  # over twice the limit: websockets closes the connection
            await ws.wait_closed()
            return refused, ws.close_code

    with running_server(tiny_runner, ServerLimits(max_message_bytes=100_000)) as (_, url):
        refused, code = asyncio.run(scenario(url))
    assert refused["code"] == "message_too_large" and code == 1009


def test_a_server_bug_costs_one_message_not_the_connection(tiny_runner, monkeypatch):
    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(StreamSession, "stats", broken)

    async def scenario(url):
        async with connect(url) as ws:
            await ws.send(json.dumps(dict(type="start")))
            await ws.recv()
            await ws.send(json.dumps(dict(type="stats")))
            failed = json.loads(await ws.recv())
            await ws.send(json.dumps(dict(type="ping")))
            return failed, json.loads(await ws.recv())

    with running_server(tiny_runner) as (_, url):
        failed, pong = asyncio.run(scenario(url))
    assert failed["code"] == "internal_error" and pong["type"] == "pong"


def test_waiting_frames_are_bounded_in_bytes(tiny_runner):
    frame_bytes = 56 * 112 * 3  # a test frame at model resolution

    async def scenario(url, server):
        async with StreamerClient(url) as client:
            await client.start(chunk_frames=4)
            await push(client, random_frames(1))
            await client.stats()
            waiting = next(iter(server.sessions.values())).max_pending  # 10 fit, not 4 chunks' 16
        async with connect(url) as ws:  # a chunk that cannot fit is refused with its first frame
            await ws.send(json.dumps(dict(type="start", chunk_frames=12)))
            await ws.recv()
            await ws.send(encode_image(random_frames(1)[0], "PNG"))
            return waiting, json.loads(await ws.recv())

    with running_server(tiny_runner, ServerLimits(max_pending_bytes=10 * frame_bytes)) as (server, url):
        waiting, refused = asyncio.run(scenario(url, server))
    assert waiting == 10
    assert refused["code"] == "bad_option" and "chunk of 12 frames" in refused["message"]
