"""The websocket client as an async Python API (`streamer client` is its command line, streamer/cli/client.py).

    async with StreamerClient("ws://127.0.0.1:8765") as client:
        await client.start(policy="emloc")
        for frame in FileSource("clip.mp4", Sampling(fps=1.0)):
            await client.send_frame(frame.image, frame.ts)
        await client.flush()
        answer = await client.ask("What happens?", on_text=lambda t: print(t, end=""))

One reader task routes incoming messages: tokens, answers and errors carrying an ask's id go to
that question; replies to start/stats/save/load/ping, and errors naming that kind of request, go
to the oldest request of that kind; progress, warnings and other errors (a refused frame, a chunk
that failed) go to `events`, never to an unrelated request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import defaultdict, deque
from typing import Callable, Iterator

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from video_io.frames import Frame
from video_io.images import encode_image

log = logging.getLogger("streamer")
REPLIES = {"ready": "start", "stats": "stats", "saved": "save", "loaded": "load", "pong": "ping"}


class ServerError(Exception):
    def __init__(self, message: dict):
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = message.get("code")
        self.message = message


class StreamerClient:
    def __init__(self, url: str, token: str | None = None):
        self.url = url
        self.token = token
        self.connection: ClientConnection | None = None
        self.events: asyncio.Queue = asyncio.Queue()  # progress, warnings, ingest_done, errors without a request
        self.waiting: dict[str, deque[asyncio.Future]] = defaultdict(deque)
        self.questions: dict[object, asyncio.Queue] = {}
        self.ids = itertools.count(1)
        self.reader: asyncio.Task | None = None
        self.frames_refused: dict | None = None  # the latest refusal of a frame (e.g. frame_limit), if any
        self.last_error: dict | None = None  # the latest error of no request (why a server closed, e.g. idle_timeout)

    async def __aenter__(self) -> "StreamerClient":
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.connection = await connect(self.url, additional_headers=headers, max_size=None)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                self._route(json.loads(raw))
        except ConnectionClosed as exc:  # closed without a close frame: the server's process died, or the network
            log.warning("the connection to %s was lost (%s)", self.url, exc)
        finally:  # the connection is gone: nobody waiting may hang
            closed = ServerError({"code": "connection_closed", "message": "the server closed the connection"})
            for futures in self.waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(closed)
            for queue in self.questions.values():
                queue.put_nowait(dict(type="error", code="connection_closed", message="the connection closed"))

    def _route(self, message: dict) -> None:
        kind = message.get("type")
        question = self.questions.get(message.get("id"))
        if question is not None and kind in ("token", "answer", "error"):
            question.put_nowait(message)
        elif kind in REPLIES and self.waiting[REPLIES[kind]]:
            self.waiting[REPLIES[kind]].popleft().set_result(message)
        elif kind == "error" and self.waiting.get(message.get("request")):
            self.waiting[message["request"]].popleft().set_exception(ServerError(message))
        else:
            if kind == "error" and message.get("request") == "frame":
                self.frames_refused = message
            elif kind == "error":
                self.last_error = message
            self.events.put_nowait(message)

    async def _request(self, kind: str, **fields) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.waiting[kind].append(future)
        await self.connection.send(json.dumps(dict(type=kind, **fields)))
        return await future

    async def start(self, **options) -> dict:
        return await self._request("start", **options)

    async def stats(self) -> dict:
        return await self._request("stats")

    async def ping(self) -> dict:
        return await self._request("ping")

    async def save(self, path: str) -> dict:
        return await self._request("save", path=path)

    async def load(self, path: str) -> dict:
        return await self._request("load", path=path)

    async def send_frame(self, image: np.ndarray | bytes, ts: float | None = None, image_format: str = "JPEG") -> None:
        if ts is not None:
            await self.connection.send(json.dumps(dict(type="frame", ts=ts)))
        data = image if isinstance(image, bytes) else await asyncio.to_thread(encode_image, image, image_format)
        await self.connection.send(data)

    async def ingest(self, source: str, **options) -> None:
        await self.connection.send(json.dumps(dict(type="ingest", source=source, **options)))

    async def flush(self) -> None:
        await self.connection.send(json.dumps(dict(type="flush")))

    async def ask(self, question: str, max_new_tokens: int | None = None,
                  on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
                  question_id: str | None = None) -> dict:
        """Ask and wait for the answer message; streamed text pieces go to on_text. ignore_eos: generate
        max_new_tokens whatever the model says (for benchmarks, as vLLM's ignore_eos). question_id: the id
        to cancel it by (default: the next of q1, q2, ...)."""
        question_id = question_id or f"q{next(self.ids)}"
        queue = self.questions[question_id] = asyncio.Queue()
        fields = dict(id=question_id, question=question)
        if max_new_tokens is not None:
            fields["max_new_tokens"] = max_new_tokens
        if ignore_eos:
            fields["ignore_eos"] = True
        try:
            await self.connection.send(json.dumps(dict(type="ask", **fields)))
            while True:
                message = await queue.get()
                if message["type"] == "token" and on_text is not None:
                    on_text(message["text"])
                elif message["type"] == "answer":
                    return message
                elif message["type"] == "error":
                    raise ServerError(message)
        finally:
            del self.questions[question_id]

    async def cancel(self, question_id: str) -> None:
        """Stop answering a question: its ask returns the text so far, with `cancelled`."""
        await self.connection.send(json.dumps(dict(type="cancel", id=question_id)))

    async def wait_ingested(self, timeout: float = 600.0, poll: float = 0.05) -> dict:
        """Wait until the server has ingested every frame sent so far; returns the final stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            if stats["frames_pending"] == 0 and stats["chunks_queued"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"frames still being ingested after {timeout:.0f} s: {stats}")
            await asyncio.sleep(poll)

    async def wait_for_room(self, frames: int, poll: float = 0.02) -> None:
        """Wait until at most `frames` of the frames sent wait on the server (pending or in queued chunks)."""
        while True:
            stats = await self.stats()
            if stats["frames_received"] - stats["frames_ingested"] - stats["frames_dropped"] <= frames:
                return
            await asyncio.sleep(poll)

    async def next_event(self, kind: str, timeout: float | None = None) -> dict:
        """Wait for the next event of one kind (e.g. 'ingest_done'); other events are logged."""
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event.get("type") == kind:
                return event
            log_event(event)


def log_event(event: dict) -> None:
    kind = event.get("type")
    if kind == "progress":
        ratios = event.get("ratios")
        log.info("ingested %d frames in %d chunks: memory %.0f of %d tokens%s", event["frames"], event["chunks"],
                 event["memory_tokens"], event["full_tokens"],
                 f", ratios {' '.join(f'{r:.3g}' for r in ratios)}" if ratios else "")
    elif kind in ("warning", "error"):
        log.warning("%s %s: %s", kind, event.get("code"), event.get("message"))
    elif kind == "draining":  # the server's replica is being stopped (Ray Serve)
        log.warning("the server is draining: %s", event.get("message"))
    else:
        log.info("%s", event)


async def stream_frames(client: StreamerClient, frames: Iterator[Frame], realtime: bool,
                        on_frame: Callable[[int, Frame], None] | None = None, chunk_frames: int | None = None) -> int:
    """Send frames, at their timestamps' pace when realtime, else as fast as the server ingests them: with
    `chunk_frames` (the session's), after each chunk's worth the client waits until at most two chunks wait on
    the server, so a file sent fast is ingested whole instead of overrunning the server's pending frames.
    Frames are read on a worker thread (a live source blocks until its next frame arrives), so the client
    goes on receiving answers meanwhile. on_frame(count, frame) after each frame sent."""
    started = time.monotonic()
    count = 0
    frames = iter(frames)
    while (frame := await asyncio.to_thread(next, frames, None)) is not None:
        if client.frames_refused is not None and client.frames_refused.get("code") == "frame_limit":
            log.warning("the server takes no more frames (%s); %d sent", client.frames_refused.get("message"), count)
            break
        if realtime:
            await asyncio.sleep(max(0.0, frame.ts - (time.monotonic() - started)))
        await client.send_frame(frame.image, frame.ts)
        count += 1
        if on_frame is not None:
            on_frame(count, frame)
        if not realtime and chunk_frames and count % chunk_frames == 0:
            await client.wait_for_room(2 * chunk_frames)
    return count
