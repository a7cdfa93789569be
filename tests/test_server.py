"""The websocket service over real loopback connections, on the tiny model."""

import asyncio
import gc
import io
import json
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
import urllib.error
import urllib.request
import weakref
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import live_http, random_frames, stream, ts_parts
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamer.cli.ask import ask_video
from streamer.service.client import ServerError, StreamerClient
from streamer.config import load_config, override
from streamer.service.server import serving
from streamer.service.service import StreamService
from streamer.service.protocol import ServerLimits
from video_io.sampling import Sampling
from video_io.sources import FileSource
from video_io.images import encode_image
from video_io.synthetic import write_video

PIXELS = 56 * 112


def server_config(policy="emloc", pixels=PIXELS):
    config = load_config("stream_default")
    override(config, "video", min_pixels=pixels, max_pixels=pixels)
    override(config, "memory", policy=policy, chunk_frames=4, budget=0)
    override(config, "emloc", group_size=2, delta=0.05)
    override(config, "probe", js_positions=3, answer_tokens=2)
    override(config, "generation", max_new_tokens=6)
    return config.validate()


@contextmanager
def running_server(runner, limits=None, config=None, tls=None):
    """A StreamService on a free loopback port, served as `streamer serve` serves it (its ASGI app on uvicorn,
    the app Ray Serve's replicas run) on a thread with its own event loop."""
    service = StreamService(runner, config or server_config(), limits or ServerLimits())
    with serving(service, tls=tls) as port:
        yield service, f"{'wss' if tls else 'ws'}://127.0.0.1:{port}"


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def png(image: np.ndarray) -> bytes:
    return encode_image(image, "PNG")


async def push(client, frames, ts0=0.0):
    for i, image in enumerate(frames):
        await client.send_frame(png(image), ts=ts0 + i * 0.5)


def test_answer_through_the_server_equals_streamer_ask(family_runner, clip):
    """Pushed frames (at the rate the client states) and a server-side read both answer as `streamer ask`,
    on each family (Qwen2.5-VL's positions and Qwen3-VL's frame times follow the rate: 12 frames over the 3 s
    clip, 4 fps)."""
    config = server_config(pixels=family_runner.preset.max_pixels)  # Qwen3-VL's frames are 64 x 128
    config.video.frames, config.video.fps = 12, None
    expected, memory = ask_video(family_runner, str(clip / "clip.mp4"), "What happens?", config)
    source = FileSource(clip / "clip.mp4", Sampling(frames=12))
    frames = [f.image for f in source]
    assert source.sampled_fps == 4.0 and memory.fps in (None, 4.0)

    async def scenario(url):
        async with StreamerClient(url) as client:  # frames pushed as lossless PNG
            await client.start(fps=source.sampled_fps)
            await push(client, frames)
            await client.flush()
            pushed_stats = await client.wait_ingested()
            pushed = await client.ask("What happens?")
        async with StreamerClient(url) as client:  # the server reads the same file itself
            await client.start()
            await client.ingest("clip.mp4", frames=12)
            done = await client.next_event("ingest_done", timeout=60)
            read_stats = await client.wait_ingested()
            read = await client.ask("What happens?")
        return pushed, pushed_stats, read, read_stats, done

    with running_server(family_runner, ServerLimits(allowed_roots=[clip]), config) as (_, url):
        pushed, pushed_stats, read, read_stats, done = asyncio.run(scenario(url))
    assert done["frames_read"] == 12
    for answer, stats in ((pushed, pushed_stats), (read, read_stats)):
        assert answer["text"] == expected["answer"]
        assert stats["memory_tokens_per_layer"] == expected["memory_tokens_per_layer"]
        assert stats["full_tokens"] == expected["full_tokens"]
        assert stats["coverage"] == expected["coverage"] and stats["coverage"][0]["held"] > 0  # what each stretch holds
        assert answer["stats"]["tokens"] == expected["answer_tokens"]


def test_concurrent_sessions_get_their_own_answers(tiny_runner):
    sessions = int(os.environ.get("LOAD_SESSIONS", "8"))  # tests/test_load.py says how to run more
    videos = [random_frames(8, seed=100 + i) for i in range(sessions)]
    questions = ["What happens?", "Describe the video."]
    policy = server_config().make_policy()
    expected = []
    for frames in videos:
        memory = stream(tiny_runner, frames, 4, policy)
        expected.append([tiny_runner.answer(memory, q, 6).text for q in questions])

    async def one(url, frames):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, frames)
            await client.wait_ingested()
            pieces = [[] for _ in questions]  # a session's answers are generated together: pieces interleave
            answers = await asyncio.gather(*[client.ask(q, on_text=into.append) for q, into in zip(questions, pieces)])
            stats = await client.stats()
            return [a["text"] for a in answers], stats, pieces

    async def scenario(url):
        return await asyncio.gather(*[one(url, frames) for frames in videos])

    limits = ServerLimits(max_sessions=max(16, sessions), max_unstarted=max(16, sessions))
    with running_server(tiny_runner, limits) as (server, url):
        results = asyncio.run(scenario(url))
        wait_until(lambda: server.sessions == {})
    for (answers, stats, pieces), want in zip(results, expected):
        assert answers == want
        assert stats["frames_ingested"] == 8 and stats["questions_answered"] == 2
        assert ["".join(into) for into in pieces] == want  # each answer's streamed pieces add up to it


def test_a_question_mid_chunk_sees_every_frame_and_leaves_the_chunks_whole(tiny_runner):
    """Asked with two frames pending (half a chunk), a question is answered as if the stream had ended there;
    the memory then goes on in whole chunks, as if nobody had asked."""
    frames = random_frames(12, seed=7)
    policy = server_config().make_policy()
    ended = stream(tiny_runner, frames[:10], 4, policy)
    want = tiny_runner.answer(ended, "What happens?", 6)
    unasked = stream(tiny_runner, frames, 4, policy)

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, frames[:8])
            await client.wait_ingested()
            await push(client, frames[8:10], ts0=4.0)
            answer = await client.ask("What happens?")
            await push(client, frames[10:], ts0=5.0)
            return answer, await client.wait_ingested()

    with running_server(tiny_runner) as (_, url):
        answer, stats = asyncio.run(scenario(url))
    assert answer["text"] == want.text and answer["stats"]["frames"] == 10 and answer["stats"]["frames_behind"] == 0
    assert answer["stats"]["memory_tokens"] == ended.mean_tokens()
    assert stats["chunks"] == 3 and stats["memory_tokens_per_layer"] == unasked.tokens_per_layer()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (an image bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is edited to claim width x height pixels."""
    data = bytearray(encode_image(random_frames(1, size=(16, 16))[0], "JPEG"))
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


BAD_START = [
    ({"delta": float("nan")}, "bad_option"), ({"delta": float("inf")}, "bad_option"),
    ({"ratios": [0.1, float("nan")]}, "bad_option"), ({"chunk_frames": 100_000}, "bad_option"),
    ({"colour": "red"}, "bad_option"), ({"delta": -0.1}, "bad_option"), ({"ratios": []}, "bad_option"),
    ({"ratios": [0.1, 1.5]}, "bad_option"), ({"policy": "magic"}, "bad_option"), ({"chunk_frames": 3}, "bad_option"),
    ({"probe": "question"}, "bad_option"), ({"delta": "abc"}, "bad_option"), ({"budget": 10**9}, "bad_option"), ({"budget": 0}, "bad_option"),
    ({"policy": "emloc", "ratio": 0.2}, "bad_option"), ({"max_pixels": 10**9}, "bad_option"),
    ({"fps": 0}, "bad_option"), ({"fps": -2.5}, "bad_option"), ({"fps": "fast"}, "bad_option"),
]


def hostile_limits(root) -> ServerLimits:
    """The limits refuse_hostile_inputs runs under, with its files made under `root` (the clip fixture's)."""
    (root / "adir").mkdir(exist_ok=True)
    write_video(root.parent / "outside.mp4", 4, size=(112, 56))
    return ServerLimits(allowed_roots=[root], max_message_bytes=200_000, max_frames_per_session=40)


async def refuse_hostile_inputs(url: str, root) -> list[str]:
    """Every kind of bad input on one connection, each refused with its code while the session goes on;
    returns the codes in order."""
    outside = root.parent / "outside.mp4"
    gif = io.BytesIO()
    Image.new("RGB", (112, 56)).save(gif, format="GIF")

    async def expect(ws, payload, code):
        await ws.send(payload)
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if reply["type"] == "error":
                assert reply["code"] == code, (payload if isinstance(payload, str) else "binary", reply)
                assert reply["message"]
                return reply
            assert reply["type"] in ("progress", "warning", "ingest_done"), reply

    codes = []
    async with connect(url, max_size=None) as ws:
        for payload, code in [
            ("{bad json", "bad_json"), ("[1, 2]", "bad_message"), ('{"no": "type"}', "bad_message"),
            ("1" * 5000, "bad_json"), ("[" * 200_000, "bad_json"),
            ('{"type": "ask", "id": ' + "9" * 5000 + ', "question": "Hi?"}', "bad_json"),
            ('{"type": 5}', "bad_message"), (png(random_frames(1)[0]), "not_started"),
            ('{"type": "ask", "id": 1, "question": "Hi?"}', "not_started"),
        ] + [(json.dumps(dict(type="start", **opts)), code) for opts, code in BAD_START]:
            codes.append((await expect(ws, payload, code))["code"])
        await ws.send(json.dumps(dict(type="start")))
        assert json.loads(await ws.recv())["type"] == "ready"
        frame = random_frames(1)[0]
        for payload, code in [
            (json.dumps(dict(type="start")), "already_started"),
            ('{"type": "dance"}', "unknown_type"),
            (json.dumps(dict(type="ask", id="early", question="What?")), "no_video"),
            (json.dumps(dict(type="load", path="clip.mp4")), "bad_snapshot"),
            (os.urandom(500), "bad_image"),
            (gif.getvalue(), "bad_image"),
            (png_claiming(60000, 60000), "bad_image"), (jpeg_claiming(60000, 60000), "bad_image"),
            (json.dumps(dict(type="ask", id=5, question="\ud800?")), "bad_question"),
            (json.dumps(dict(type="ingest", source="clip.mp4", fps=float("nan"))), "bad_option"),
            (json.dumps(dict(type="ingest", source="clip\0.mp4")), "bad_option"),
            (json.dumps(dict(type="ingest", source="x" * 100_000)), "bad_option"),
            (json.dumps(dict(type="ingest", source="y" * 300 + ".mp4")), "bad_option"),
            (json.dumps(dict(type="save", path="adir")), "bad_option"),  # a directory
            (json.dumps(dict(type="save", path="nodir/memory.safetensors")), "bad_option"),  # no such folder
            (json.dumps(dict(type="load", path="missing.safetensors")), "not_found"),
            (b"x" * 250_000, "message_too_large"),
            (json.dumps(dict(type="frame", ts=-1)), "bad_option"),
            (png(frame), None),
            (png(random_frames(1, size=(56, 56))[0]), "frame_size_changed"),
            (json.dumps(dict(type="ask", id=2, question="  ")), "bad_question"),
            (json.dumps(dict(type="ask", id=3, question="Q?", max_new_tokens=0)), "bad_option"),
            (json.dumps(dict(type="ask", id=4, question="Q?", max_new_tokens=10**6)), "bad_option"),
            (json.dumps(dict(type="ingest", source="missing.mp4")), "not_found"),
            (json.dumps(dict(type="ingest", source=str(outside))), "forbidden_path"),
            (json.dumps(dict(type="ingest", source="../outside.mp4")), "forbidden_path"),
            (json.dumps(dict(type="ingest", source="file:///etc/passwd")), "forbidden_path"),
            (json.dumps(dict(type="ingest", source="rtsp://127.0.0.1:9/x")), "urls_disabled"),
            (json.dumps(dict(type="ingest", source="clip.mp4", fps=1, frames=3)), "bad_option"),
            (json.dumps(dict(type="save", path="/tmp/elsewhere.safetensors")), "forbidden_path"),
            (json.dumps(dict(type="load", path="clip.mp4")), "busy"),  # a frame is pending
            (json.dumps(dict(type="ingest", source="corrupt.mp4")), "bad_video"),
        ]:
            if code is None:
                await ws.send(payload)
                continue
            reply = await expect(ws, payload, code)
            codes.append(reply["code"])
            if '"id": "early"' in str(payload):
                assert reply["id"] == "early"
        for _ in range(39):  # the frame limit (40 per session)
            await ws.send(png(frame))
        codes.append((await expect(ws, png(frame), "frame_limit"))["code"])
        await ws.send(json.dumps(dict(type="flush")))
        while True:  # until every frame is ingested
            await ws.send(json.dumps(dict(type="stats")))
            while (reply := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "stats":
                assert reply["type"] in ("progress", "warning", "ingest_done"), reply
            if reply["frames_pending"] == 0 and reply["chunks_queued"] == 0:
                break
            await asyncio.sleep(0.05)
        # the connection still works after all of that; a null max_new_tokens takes the default
        await ws.send(json.dumps(dict(type="ask", id="null", question="What happens?", max_new_tokens=None)))
        while (reply := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "answer":
            assert reply["type"] in ("token", "progress", "warning", "ingest_done"), reply
        assert reply["id"] == "null"
        codes.append(reply["text"])  # what the session answers after all of that, for comparing transports
        await ws.send(json.dumps(dict(type="ask", id="ok", question="What happens?", max_new_tokens=3)))
        while (reply := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "answer":
            assert reply["type"] in ("token", "progress", "warning", "ingest_done"), reply
        assert reply["id"] == "ok"
    return codes



def test_bad_inputs_are_refused_with_codes_and_the_session_goes_on(tiny_runner, clip):
    with running_server(tiny_runner, hostile_limits(clip)) as (server, url):
        codes = asyncio.run(refuse_hostile_inputs(url, clip))
        health = json.loads(urllib.request.urlopen(url.replace("ws://", "http://") + "/health", timeout=10).read())
        assert health["status"] == "ok"
    assert len(codes) >= 20


def test_session_limit_token_and_health(tiny_runner):
    async def scenario(url):
        async with StreamerClient(url, token="secret") as first:
            await first.start()
            async with StreamerClient(url, token="secret") as second:
                with pytest.raises(ServerError) as refused:
                    await second.start()
                assert refused.value.code == "too_many_sessions"
                assert (await second.ping())["type"] == "pong"  # the refused connection stays usable
        refusals = []
        for attempt in (dict(additional_headers={"Authorization": "Bearer guess"}),
                        dict(additional_headers=[("Authorization", "Bearer secret")] * 2),  # two headers
                        dict(uri=url + "?token=secret")):  # tokens in URLs end up in logs: not accepted
            with pytest.raises(InvalidStatus) as wrong:
                async with connect(attempt.pop("uri", url), **attempt):
                    pass
            refusals.append(wrong.value.response)
        return refusals

    with running_server(tiny_runner, ServerLimits(max_sessions=1, token="secret")) as (_, url):
        refusals = asyncio.run(scenario(url))
        health = urllib.request.urlopen(url.replace("ws://", "http://") + "/health", timeout=10)
        assert health.status == 200 and json.loads(health.read())["model"] == "tiny-random"
        assert health.headers["Content-Type"] == "application/json"  # on both transports
    for response in refusals:
        assert response.status_code == 401
        assert json.loads(response.body)["code"] == "unauthorized"


def slowed(runner, seconds, jobs=None):
    """The runner's ingest slowed down, so that work queues up; each call is noted in `jobs` as it starts."""
    original = runner.ingest

    def ingest(*args, **kwargs):
        if jobs is not None:
            jobs.append("ingest")
        time.sleep(seconds)
        return original(*args, **kwargs)

    return ingest


def noted(runner, jobs):
    """The runner's begin (an answer's start), noting each call in `jobs` as it starts."""
    original = runner.begin

    def begin(*args, **kwargs):
        jobs.append("ask")
        return original(*args, **kwargs)

    return begin


def test_questions_overtake_queued_ingestion(tiny_runner, monkeypatch):
    jobs = []  # model jobs in the order they ran
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.3, jobs))
    monkeypatch.setattr(tiny_runner, "begin", noted(tiny_runner, jobs))
    limits = ServerLimits(max_queued_chunks=8, max_pending_frames=64)

    async def scenario(url, server):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, random_frames(4))
            await client.wait_ingested()
            await push(client, random_frames(16, seed=1))  # four more chunks queue up
            answer = await client.ask("What now?", max_new_tokens=2)
            kinds = list(jobs)
            await client.wait_ingested()
        return kinds, answer["stats"]

    with running_server(tiny_runner, limits) as (server, url):
        kinds, stats = asyncio.run(scenario(url, server))
    # 1 chunk before, at most 1 running when the question came (+1 for frame-decoding slack), 4 queued
    assert kinds.index("ask") <= 3, f"the question waited for the queued chunks: {kinds}"
    assert stats["frames_behind"] >= 8 and stats["frames"] + stats["frames_behind"] == 20, stats


def test_a_question_before_the_first_chunk_is_in_sees_every_frame(tiny_runner, monkeypatch):
    """Ingestion more than a chunk behind answers from the memory alone, but with nothing in it yet (the stream's
    first chunks still queued) the question sees every frame received, rather than failing."""
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.3))
    frames = random_frames(12)

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, frames)
            return await client.ask("What now?", max_new_tokens=3)

    with running_server(tiny_runner, ServerLimits(max_queued_chunks=8)) as (_, url):
        answer = asyncio.run(scenario(url))
    assert answer["stats"]["frames"] == 12 and answer["stats"]["frames_behind"] == 0


def test_disconnect_mid_ingest_frees_the_session(tiny_runner, monkeypatch):
    jobs = []
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.2, jobs))
    limits = ServerLimits(max_queued_chunks=8, max_pending_frames=64)

    async def scenario(url, server):
        client = await StreamerClient(url).__aenter__()
        await client.start()
        await push(client, random_frames(32))
        await asyncio.sleep(0.1)
        session = next(iter(server.sessions.values()))
        memory = weakref.ref(session.memory)
        queued = session.queued_chunks
        await client.close()
        for _ in range(100):
            if not server.sessions:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # any chunk already running on the model thread finishes
        return memory, queued, len(jobs)

    with running_server(tiny_runner, limits) as (server, url):
        memory, queued, jobs_run = asyncio.run(scenario(url, server))
        assert server.sessions == {}
        gc.collect()
        assert memory() is None, "the closed session's memory is still referenced"
        assert jobs_run < queued, "queued chunks of a closed session were still run"


def test_backpressure_thins_frames_with_a_warning(tiny_runner, monkeypatch):
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.3))
    limits = ServerLimits(max_pending_frames=8, max_queued_chunks=1)

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, random_frames(40))
            warning = await client.next_event("warning", timeout=30)
            stats = await client.stats()
            return warning, stats

    with running_server(tiny_runner, limits) as (_, url):
        warning, stats = asyncio.run(scenario(url))
    assert warning["code"] == "frames_dropped" and warning["dropped"] > 0
    assert stats["frames_pending"] <= 8 and stats["frames_dropped"] > 0


def test_snapshot_save_and_load_over_the_protocol(tiny_runner, tmp_path):
    def tampered(name, edit):  # a copy of the saved snapshot with its JSON header edited, inside the root
        with safe_open(tmp_path / "memory.safetensors", framework="pt") as f:
            metadata = f.metadata()
        meta = json.loads(metadata["meta"])
        edit(meta)
        save_file(load_file(tmp_path / "memory.safetensors"), tmp_path / name,
                  metadata={**metadata, "meta": json.dumps(meta)})

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            await push(client, random_frames(8, seed=7))
            await client.wait_ingested()
            before = await client.ask("What happens?")
            saved = await client.save("memory.safetensors")
        tampered("layers.safetensors", lambda meta: meta.update(num_layers=2_000_000))
        tampered("stream.safetensors", lambda meta: meta.update(stream=None))
        async with StreamerClient(url) as client:
            await client.start()
            loaded = await client.load("memory.safetensors")
            after = await client.ask("What happens?")
            refused = []
            for name in ("layers.safetensors", "stream.safetensors"):
                with pytest.raises(ServerError) as error:
                    await client.load(name)
                refused.append(error.value.message)
            still = await client.ask("What happens?")  # the session and its memory go on
        return before, saved, loaded, after, refused, still

    with running_server(tiny_runner, ServerLimits(allowed_roots=[tmp_path])) as (_, url):
        before, saved, loaded, after, refused, still = asyncio.run(scenario(url))
    assert (tmp_path / "memory.safetensors").is_file()
    assert loaded["frames"] == saved["frames"] == 8
    assert after["text"] == before["text"] == still["text"]
    assert [message["code"] for message in refused] == ["bad_snapshot", "bad_snapshot"]
    assert "layers" in refused[0]["message"] and "stream" in refused[1]["message"]


def test_idle_sessions_are_closed(tiny_runner):
    async def scenario(url):
        async with connect(url) as ws:
            await ws.send(json.dumps(dict(type="start")))
            await ws.recv()
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return reply

    with running_server(tiny_runner, ServerLimits(idle_timeout=0.5)) as (server, url):
        reply = asyncio.run(scenario(url))
        wait_until(lambda: server.sessions == {})
    assert reply["code"] == "idle_timeout"


def test_connections_without_a_session_are_bounded_and_timed_out(tiny_runner):
    async def scenario(url):
        first, second = await connect(url), await connect(url)
        for ws in (first, second):  # both handlers are running
            await ws.send(json.dumps(dict(type="ping")))
            assert json.loads(await ws.recv())["type"] == "pong"
        async with connect(url) as third:  # over the limit of connections without a session
            refused = json.loads(await asyncio.wait_for(third.recv(), 10))
        timed_out = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for ws in (first, second)]
        for ws in (first, second):
            await ws.wait_closed()
        async with StreamerClient(url) as client:  # their places are free again
            ready = await client.start()
        return refused, timed_out, ready

    with running_server(tiny_runner, ServerLimits(max_unstarted=2, start_timeout=0.5)) as (server, url):
        refused, timed_out, ready = asyncio.run(scenario(url))
        wait_until(lambda: server.unstarted == 0 and server.sessions == {})
    assert refused["code"] == "too_many_connections"
    assert [reply["code"] for reply in timed_out] == ["start_timeout", "start_timeout"]
    assert ready["type"] == "ready"


def test_a_long_server_side_ingest_is_not_idle_and_done_means_ingested(tiny_runner, clip, monkeypatch):
    """The client is silent while 4 slow chunks are ingested (longer than the idle timeout) and the session
    stays; ingest_done comes once every frame is in the memory (it came when the file was read, with chunks still
    queued: a question then saw 16 of 64 frames), so the stats right after it and a question see them all."""
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.3))

    async def scenario(url):
        async with StreamerClient(url) as client:
            await client.start()
            await client.ingest("clip.mp4", frames=16)  # 4 chunks of 0.3 s: longer than the idle timeout
            done = await client.next_event("ingest_done", timeout=30)
            stats = await client.stats()
            answer = await client.ask("What happens?", max_new_tokens=1)
        return done, stats, answer

    with running_server(tiny_runner, ServerLimits(allowed_roots=[clip], idle_timeout=0.4)) as (_, url):
        done, stats, answer = asyncio.run(scenario(url))
    assert done["frames_read"] == 16 and done["frames_ingested"] == 16
    assert stats["frames_ingested"] == 16 and stats["chunks_queued"] == 0
    assert answer["stats"]["frames_behind"] == 0 and answer["stats"]["frames"] == 16


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test's certificate")
def test_tls_serves_the_page_and_sessions_over_https_and_wss(tiny_runner, tmp_path):
    """--tls-cert/--tls-key: the page over https and a session over wss (a browser's camera needs https
    anywhere but localhost); a bad certificate is refused in one line before the model loads."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE

    async def session(url):
        async with connect(url, ssl=unverified) as websocket:
            await websocket.send(json.dumps(dict(type="start")))
            return json.loads(await websocket.recv())

    with running_server(tiny_runner, tls=(str(cert), str(key))) as (_, url):
        assert url.startswith("wss://")
        with urllib.request.urlopen(url.replace("wss://", "https://") + "/", context=unverified, timeout=10) as page:
            status, body = page.status, page.read()
        ready = asyncio.run(session(url))
    assert status == 200 and b"<html" in body.lower() and ready["type"] == "ready"
    result = subprocess.run([sys.executable, "-m", "streamer", "serve", "--tls-cert", str(key), "--tls-key", str(key),
                             "--port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tls-cert" in result.stderr and "Traceback" not in result.stderr


def test_serve_command_shuts_down_cleanly_on_sigterm(tmp_path):
    port = 20000 + os.getpid() % 20000
    process = subprocess.Popen(
        [sys.executable, "-m", "streamer", "serve", "--port", str(port), "--device", "cpu"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        assert health.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "shutting down" in process.stderr.read()
    finally:
        process.kill()


def test_client_command_streams_and_answers(tiny_runner, clip, capsys):
    from streamer.cli import main

    with running_server(tiny_runner) as (_, url):
        # the README's example: a question when half the frames are sent, before any chunk is ingested
        code = main(["-q", "client", str(clip / "clip.mp4"), "--url", url, "--fast", "--frames", "8",
                     "--ask-during", "So far?", "--ask", "What happens?", "--json-stats"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Q: So far?" in out and "Q: What happens?" in out and "A: " in out
    stats = json.loads(out[out.index("{"):])
    assert stats["frames_ingested"] == 8 and stats["questions_answered"] == 2


def test_client_fast_sends_no_faster_than_the_server_ingests(tiny_runner, tmp_path, capsys, monkeypatch):
    """`client --fast` on a slow server: every frame of the file is ingested, none dropped (it overran the
    server's pending frames -- 4 chunks, plus 2 queued -- and 42% of a 384-frame file was dropped)."""
    from streamer.cli import main

    write_video(tmp_path / "long.mp4", 64, fps=8.0, size=(112, 56))
    monkeypatch.setattr(tiny_runner, "ingest", slowed(tiny_runner, 0.05))
    with running_server(tiny_runner) as (_, url):  # chunks of 4 frames: 16 pending and 8 queued at most
        code = main(["-q", "client", str(tmp_path / "long.mp4"), "--url", url, "--fast", "--frames", "64",
                     "--json-stats"])
    out = capsys.readouterr().out
    stats = json.loads(out[out.index("{"):])
    assert code == 0 and stats["frames_dropped"] == 0 and stats["frames_ingested"] == 64


def test_frames_without_a_time_keep_the_streams_time_and_progress_counts_each_stage_once(tiny_runner):
    """Frames pushed without "ts" continue the stream's time at its rate across chunks (they restarted at 0 with
    every chunk); a chunk's progress `seconds` is its stages' sum, the policy's own probe and search inside it (they
    were counted twice); a server whose config has no budget gives its sessions the largest one, not none."""
    frames = random_frames(12, seed=41)

    async def scenario(url, server):
        async with StreamerClient(url) as client:
            await client.start(fps=2.0)
            for image in frames:
                await client.send_frame(png(image))
            progress = [await client.next_event("progress", timeout=60) for _ in range(3)]
            stats = await client.stats()
            return progress, stats, list(next(iter(server.sessions.values())).memory.chunks)

    with running_server(tiny_runner) as (server, url):
        progress, stats, records = asyncio.run(scenario(url, server))
    assert [p["until_ts"] for p in progress] == [1.5, 3.5, 5.5]  # frames 3, 7, 11 at 2 fps
    for event, record in zip(progress, records):
        stages = record.timings
        assert event["seconds"] == pytest.approx(sum(stages[s] for s in ("preprocess", "vision", "prefill", "policy")))
        assert stages["probe"] + stages["search"] <= stages["policy"]
    assert stats["budget"] == ServerLimits().max_budget


def test_a_session_with_recall_keeps_what_it_evicts_and_answers_over_what_it_brings_back(tiny_runner):
    """A served config with recall and a host budget: the session's evicted tokens stay on the host within that
    budget, and its answer is the runner's own over the memory, recall included."""
    config = server_config(policy="full")  # everything kept: a short stream fills the budget
    override(config, "memory", budget=40, recall=20, host_budget=60)
    frames = random_frames(24, seed=42)

    async def scenario(url, server):
        async with StreamerClient(url) as client:
            await client.start(budget=40)
            await push(client, frames)
            await client.flush()
            await client.wait_ingested()
            reply = await client.ask("What happens in the video?", max_new_tokens=4)
            stats = await client.stats()
            memory = next(iter(server.sessions.values())).memory
            assert stats["recall"] == 20 and stats["host_tokens"] == pytest.approx(
                sum(len(layer) for layer in memory.host) / len(memory.layers)) and stats["host_tokens"] > 0
            return reply, memory

    with running_server(tiny_runner, config=config) as (server, url):
        reply, memory = asyncio.run(scenario(url, server))
    hosted = sum(len(layer) for layer in memory.host)
    assert memory.evicted > 0 and 0 < hosted <= 60 * tiny_runner.num_layers and memory.mean_tokens() <= 40
    expected = tiny_runner.answer(memory, "What happens in the video?", max_new_tokens=4)
    assert reply["text"] == expected.text


def test_client_command_says_what_went_wrong_in_one_line(tiny_runner, tmp_path, capsys, caplog):
    """What a client meets -- the server's frame limit mid-file, a token it lacks, a wrong address -- ends in one
    clear line and an exit code, never a traceback; the frame limit stops the sending, and the questions are still
    answered from what was ingested (a frame's refusal failed the client's own stats request before)."""
    from streamer.cli import main

    write_video(tmp_path / "long.mp4", 64, fps=8.0, size=(112, 56))
    with running_server(tiny_runner, ServerLimits(max_frames_per_session=20)) as (_, url):
        code = main(["-q", "client", str(tmp_path / "long.mp4"), "--url", url, "--fast", "--frames", "64",
                     "--ask", "What happens?"])
    out = capsys.readouterr().out
    assert code == 0 and "Q: What happens?" in out and "refused" not in out
    assert "the server takes no more frames" in caplog.text

    with running_server(tiny_runner, ServerLimits(token="secret")) as (_, url):
        for token, said in (([], "none was given"), (["--token", "wrong"], "refused this one")):
            assert main(["-q", "client", str(tmp_path / "long.mp4"), "--url", url, *token]) == 1
            assert f"wants a token and {said}; give --token or set $STREAMER_TOKEN" in capsys.readouterr().err
    assert main(["-q", "client", str(tmp_path / "long.mp4"), "--url", url.replace("ws://", "http://")]) == 1
    assert "is not a websocket address" in capsys.readouterr().err
    assert main(["-q", "client", str(tmp_path / "long.mp4"), "--url", url]) == 1  # the server is gone now
    assert "cannot connect to" in capsys.readouterr().err


def test_client_on_a_live_source_that_dies_still_answers(tiny_runner, tmp_path, capsys):
    """A live URL that drops after 24 frames: one line says the source broke off (not a normal end), the
    --ask question is answered from the frames sent, exit 1; --ask-every asks the --ask-during question as
    the stream goes; --ask-during alone on a URL is refused (it was silently skipped: no halfway)."""
    from streamer.cli import main

    parts = ts_parts(tmp_path, count=1, frames=24)
    with running_server(tiny_runner) as (_, url), live_http(parts, then="close") as source:
        code = main(["-q", "client", source, "--url", url, "--fast", "--fps", "8", "--read-timeout", "2",
                     "--ask-during", "So far?", "--ask-every", "1", "--ask", "What happens?", "--json-stats"])
    captured = capsys.readouterr()
    assert code == 1
    assert "the stream broke off after" in captured.err and "asking the questions about the" in captured.err
    assert captured.out.count("Q: So far?") >= 2 and "Q: What happens?" in captured.out
    stats = json.loads(captured.out[captured.out.index("{"):])
    assert stats["frames_ingested"] >= 16 and stats["questions_answered"] >= 3
    assert main(["-q", "client", "udp://127.0.0.1:9", "--url", url, "--ask-during", "So far?"]) == 2
    assert "--ask-every SECONDS" in capsys.readouterr().err



def test_serve_refuses_a_port_in_use_before_loading_the_model(monkeypatch, capsys, caplog):
    from streamer.cli import main

    def load_runner(config):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr("streamer.cli.serve.load_runner", load_runner)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["-q", "serve", "--model", "tiny-random", "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="port was checked"):  # a free port goes on to load, after a warning
        main(["serve", "--model", "tiny-random", "--host", "0.0.0.0", "--port", str(port)])
    assert "without a token" in caplog.text


def test_interactive_client_says_when_the_server_closes_the_session(tiny_runner, clip, capsys, monkeypatch):
    """While the interactive client waits for a question, the server's idle timeout closes the session: one
    line at once, exit 1 (it was a traceback at the next question)."""
    from streamer.cli import main

    typed = threading.Event()
    monkeypatch.setattr("streamer.cli.client._prompt", lambda: typed.wait(60) and "")
    started = time.monotonic()
    with running_server(tiny_runner, ServerLimits(idle_timeout=1.0)) as (_, url):
        code = main(["-q", "client", str(clip / "clip.mp4"), "--url", url, "--fast", "--frames", "4",
                     "--interactive"])
    typed.set()
    assert code == 1 and time.monotonic() - started < 30
    assert "the server closed the session: idle_timeout" in capsys.readouterr().err


def test_interactive_client_exits_at_once_on_ctrl_c(tiny_runner, clip):
    """Ctrl-C at the question prompt ends the client with 130 at once (a worker thread blocked on stdin kept the
    process waiting for a line)."""
    with running_server(tiny_runner) as (_, url):
        process = subprocess.Popen(
            [sys.executable, "-m", "streamer", "-q", "client", str(clip / "clip.mp4"), "--url", url, "--fast",
             "--frames", "4", "--interactive"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            shown, deadline = b"", time.monotonic() + 120
            while b"question> " not in shown:  # the prompt: frames sent, waiting for a question
                assert process.poll() is None and time.monotonic() < deadline, shown
                ready, _, _ = select.select([process.stdout], [], [], 1.0)
                if ready:
                    shown += os.read(process.stdout.fileno(), 4096)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130  # "at once": not waiting for a line; 60 s for a loaded machine
        finally:
            process.kill()


def test_a_server_side_live_source_is_opened_again_and_read_on(tiny_runner, tmp_path):
    """ingest of a URL with `reconnect`: a source that drops after 24 frames is opened again and its next 24
    frames are ingested too, stream time going on; `read_timeout`/`reconnect` on a file are refused."""
    parts = ts_parts(tmp_path, count=2, frames=24)

    async def scenario(url, source):
        async with StreamerClient(url) as client:
            await client.start(chunk_frames=4)
            await client.ingest(source, fps=4.0, read_timeout=2.0, reconnect=1)
            done = await client.next_event("ingest_done", timeout=120)
            await client.ingest("clip.mp4", reconnect=2)
            refused = await client.next_event("error", timeout=30)
            assert refused["code"] == "bad_option" and "for stream URLs" in refused["message"]
            return done, await client.stats()

    with running_server(tiny_runner, ServerLimits(allow_urls=True, allowed_roots=[tmp_path])) as (_, url), \
            live_http(parts, then="close") as source:
        done, stats = asyncio.run(scenario(url, source))
    assert done["frames_read"] >= 20 and stats["frames_ingested"] == done["frames_read"]  # ~12 per part at 4 fps
    assert done["frames_read"] > 14  # more than the first part alone holds at 4 fps (3 s)
