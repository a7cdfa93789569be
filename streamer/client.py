"""`streamer client` and its async Python API: stream a video to a server, ask, print answers.

    async with StreamerClient("ws://127.0.0.1:8765") as client:
        await client.start(policy="emloc")
        for frame in FileSource("clip.mp4", Sampling(fps=1.0)):
            await client.send_frame(frame.image, frame.ts)
        await client.flush()
        answer = await client.ask("What happens?", on_text=lambda t: print(t, end=""))

One reader task routes incoming messages: tokens, answers and errors carrying an ask's id go to
that question; replies to start/stats/save/load/ping go to the oldest request of that kind;
progress, warnings and other errors go to `events`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import time
from collections import defaultdict, deque
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from video_io.frames import Frame

log = logging.getLogger("streamer")
REPLIES = {"ready": "start", "stats": "stats", "saved": "save", "loaded": "load", "pong": "ping"}


class ServerError(Exception):
    def __init__(self, message: dict):
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = message.get("code")
        self.message = message


def encode_image(image: np.ndarray, image_format: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format == "JPEG" else {}
    Image.fromarray(image).save(buffer, format=image_format, **options)
    return buffer.getvalue()


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
        elif kind == "error" and (pending := next((q for q in self.waiting.values() if q), None)):
            pending.popleft().set_exception(ServerError(message))
        else:
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
                  on_text: Callable[[str], None] | None = None) -> dict:
        """Ask and wait for the answer message; streamed text pieces go to on_text."""
        question_id = f"q{next(self.ids)}"
        queue = self.questions[question_id] = asyncio.Queue()
        fields = dict(id=question_id, question=question)
        if max_new_tokens is not None:
            fields["max_new_tokens"] = max_new_tokens
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
        log.info("ingested %d frames in %d chunks: memory %.0f of %d tokens, ratios %s", event["frames"],
                 event["chunks"], event["memory_tokens"], event["full_tokens"], event.get("ratios"))
    elif kind in ("warning", "error"):
        log.warning("%s %s: %s", kind, event.get("code"), event.get("message"))
    else:
        log.info("%s", event)


async def stream_frames(client: StreamerClient, frames: Iterator[Frame], realtime: bool,
                        on_frame: Callable[[int], None] | None = None) -> int:
    """Send frames, at their timestamps' pace when realtime, else as fast as the socket takes them."""
    started = time.monotonic()
    count = 0
    for frame in frames:
        if realtime:
            await asyncio.sleep(max(0.0, frame.ts - (time.monotonic() - started)))
        await client.send_frame(frame.image, frame.ts)
        count += 1
        if on_frame is not None:
            on_frame(count)
    return count


async def log_events(client: StreamerClient) -> None:
    while True:
        log_event(await client.events.get())


async def ask_and_print(client: StreamerClient, question: str, max_new_tokens: int | None = None) -> dict:
    print(f"Q: {question}\nA: ", end="", flush=True)
    answer = await client.ask(question, max_new_tokens, on_text=lambda text: print(text, end="", flush=True))
    stats = answer["stats"]
    rate = f", {stats['tokens_per_s']:.0f} tokens/s" if stats.get("tokens_per_s") else ""
    print(f"\n   [{stats['frames']} frames, memory {stats['memory_tokens']:.0f} of {stats['full_tokens']} tokens; "
          f"first token {stats['ttft_s'] * 1000:.0f} ms{rate}]", flush=True)
    return answer


async def run_client(args) -> int:
    from video_io.sampling import Sampling
    from video_io.sources import FileSource, StreamSource

    options = {key: value for key, value in dict(
        policy=args.memory, delta=args.delta, ratios=args.ratios, group_size=args.group_size, ratio=args.ratio,
        budget=args.budget, chunk_frames=args.chunk_frames).items() if value is not None}
    async with StreamerClient(args.url, token=args.token) as client:
        ready = await client.start(**options)
        logger = asyncio.create_task(log_events(client))
        log.info("session %s on %s (%s, %d frames per chunk)", ready["session"], ready["model"], ready["policy"],
                 ready["chunk_frames"])
        if "://" in args.video:
            frames = StreamSource(args.video, fps=args.fps, max_frames=args.max_frames)
        else:
            sampling = Sampling(frames=args.frames, fps=None if args.frames else args.fps, max_frames=args.max_frames)
            frames = FileSource(args.video, sampling)
        halfway = len(frames) // 2 if hasattr(frames, "__len__") else None
        asked_during = []

        def on_frame(count: int) -> None:
            if count == halfway:
                asked_during.extend(asyncio.create_task(ask_and_print(client, q, args.max_new_tokens))
                                    for q in args.ask_during)

        sent = await stream_frames(client, iter(frames), realtime=args.realtime, on_frame=on_frame)
        await asyncio.gather(*asked_during)
        await client.flush()
        stats = await client.wait_ingested()
        log.info("sent %d frames; memory %.0f of %d tokens", sent, stats["memory_tokens"], stats["full_tokens"])
        for question in args.ask:
            await ask_and_print(client, question, args.max_new_tokens)
        if args.interactive:
            loop = asyncio.get_running_loop()
            while question := (await loop.run_in_executor(None, _prompt)).strip():
                await ask_and_print(client, question, args.max_new_tokens)
        if args.json_stats:
            print(json.dumps(await client.stats(), indent=2))
        logger.cancel()
    return 0


def _prompt() -> str:
    try:
        return input("question> ")
    except EOFError:
        return ""


def add_parser(sub) -> None:
    from streamer.cli import ratio_list

    p = sub.add_parser("client", help="stream a video to a `streamer serve` server and ask questions",
                       description="Stream a local video file (or a URL/device PyAV can open) to a server, ask "
                                   "questions during and after, print the streamed answers.")
    p.add_argument("video", help="a local video file, or a stream URL")
    p.add_argument("--url", default="ws://127.0.0.1:8765", help="the server's websocket URL")
    p.add_argument("--token", help="bearer token, if the server wants one")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, default=1.0, help="frames per second of video to send (default 1)")
    sampling.add_argument("--frames", type=int, help="send N frames spread uniformly instead")
    p.add_argument("--max-frames", type=int, help="at most this many frames")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="send frames at the video's own pace (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false", help="send frames as fast as possible")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="ask after streaming (repeatable)")
    p.add_argument("--ask-during", action="append", default=[], metavar="QUESTION",
                   help="ask when half of the frames are sent (repeatable)")
    p.add_argument("--interactive", action="store_true", help="then read questions from the terminal")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--memory", help="memory policy for this session")
    p.add_argument("--delta", type=float)
    p.add_argument("--ratios", type=ratio_list)
    p.add_argument("--group-size", type=int)
    p.add_argument("--ratio", type=float)
    p.add_argument("--budget", type=int)
    p.add_argument("--chunk-frames", type=int)
    p.add_argument("--json-stats", action="store_true", help="print the session's stats as JSON at the end")
    p.set_defaults(run=lambda args: asyncio.run(run_client(args)))
