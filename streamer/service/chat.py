"""OpenAI's chat completions over the service: POST /v1/chat/completions and GET /v1/models.

A chat completion is a short-lived session driven by a script of native messages (README, "OpenAI chat
completions"): `start` with the server's defaults, the video (`ingest` of a `video_url` path under an
allowed root, or the `image_url` frames pushed in order), `flush`, then `ask` with the last user
message's text. The session runs in the service like any other (the same limits, executor, refusals and
session count); its replies become one chat.completion, or chat.completion.chunk server-sent events when
`stream` is true. With the extension header X-Streamer-Session (a live session's key, from its `ready`),
the question is instead one more of that session's, answered from its memory as the stream goes on.
A refusal becomes OpenAI's error object with our code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from streamer.service.protocol import Disconnected, ProtocolError, number, read_json
from streamer.service.realtime import image_bytes
from streamer.service.service import StreamService

CHAT_ID = "chat"  # the id of a fresh session's one question
MAX_BODY_MESSAGES = 8  # a request body may be this many websocket messages' worth (frames as data URLs)

STATUS = {"unauthorized": 401, "session_closed": 410, "forbidden_path": 403, "not_found": 404, "too_many_sessions": 429,
          "too_many_connections": 429, "draining": 503, "internal_error": 500, "ingest_failed": 500,
          "answer_failed": 500, "urls_disabled": 403, "message_too_large": 413}


def error_body(code: str, message: str) -> tuple[int, dict]:
    """(HTTP status, OpenAI's error object) for one of our refusal codes."""
    status = STATUS.get(code, 400)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, {"error": dict(message=message, type=kind, param=None, code=code)}


@dataclass
class ChatRequest:
    """A chat completion request read into the native messages that answer it."""

    model: str
    question: str
    videos: list[str]  # video_url paths, each read by an `ingest`
    frames: list[bytes]  # image_url frames, pushed in order
    max_tokens: int | None
    stream: bool
    usage_chunk: bool  # stream_options.include_usage
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def script(self) -> list[str | bytes]:
        """The native messages up to the ask: start, the video, flush."""
        ingests = [json.dumps(dict(type="ingest", source=video)) for video in self.videos]
        return [json.dumps(dict(type="start")), *ingests, *self.frames, json.dumps(dict(type="flush"))]

    def ask(self, question_id: str) -> dict:
        """The native ask message of this request."""
        ask = dict(type="ask", id=question_id, question=self.question)
        if self.max_tokens is not None:
            ask["max_new_tokens"] = self.max_tokens
        return ask


def read_request(body, model: str, live: bool = False) -> ChatRequest:
    """The request body (parsed JSON) as a ChatRequest; a ProtocolError names what is wrong with it. `live`:
    the video is a live session's memory, so the request gives none."""
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ProtocolError("bad_message", "'messages' must be a non-empty list of message objects")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ProtocolError("bad_message", "no user message: give the video and the question in a user message")
    videos, frames = [], []
    for message in users:
        content = message.get("content")
        for part in [dict(type="text", text=content)] if isinstance(content, str) else content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "video_url":
                videos.append(url_of(part, "video_url"))
            elif kind == "image_url":
                frames.append(image_bytes(url_of(part, "image_url")))
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError("bad_message", f"content part {kind!r}: this server takes text, video_url (a "
                                    "path under the server's --allow-root) and image_url (JPEG/PNG data URL) parts")
    if live and (videos or frames):
        raise ProtocolError("bad_message", "a question to a live session (X-Streamer-Session) is about its stream: "
                            "give no video_url or image_url parts")
    if not live and len(videos) + bool(frames) != 1:
        raise ProtocolError("bad_message", "give exactly one video: one video_url part, or image_url frames "
                            f"(got {len(videos)} video_url and {len(frames)} image_url parts)")
    last = users[-1]["content"]
    texts = [last] if isinstance(last, str) else [p["text"] for p in last if p.get("type") == "text"]
    question = "\n".join(t for t in texts if t.strip())
    if not question:
        raise ProtocolError("bad_question", "the last user message has no text: ask a question in a text part")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = number(dict(max_tokens=limit), "max_tokens", minimum=1, integer=True)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ProtocolError("bad_option", "'stream' must be true or false and 'stream_options' an object")
    if body.get("n", 1) != 1:
        raise ProtocolError("bad_option", "'n' must be 1: this server gives one answer per request")
    return ChatRequest(model=body.get("model") if isinstance(body.get("model"), str) else model, question=question,
                       videos=videos, frames=frames, max_tokens=limit, stream=stream,
                       usage_chunk=bool(options.get("include_usage")))


def url_of(part: dict, kind: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value  # {"url": ...}, or the URL itself
    if not isinstance(url, str) or not url:
        raise ProtocolError("bad_message", f"a {kind} part needs {{\"{kind}\": {{\"url\": ...}}}}")
    return url.removeprefix("file://") if kind == "video_url" else url


class ScriptedConnection:
    """The service's Connection for one chat completion: its client is the request's script. The ask goes
    once every frame is in (after ingest_done, or at once for pushed frames); the first error ends it."""

    def __init__(self, request: ChatRequest, reply: Callable[[dict], None]):
        self.request = request
        self.reply = reply  # token, answer, error: for the response
        self.script = request.script()
        self.ingesting = len(request.videos)  # ingest_done messages to wait for before the ask
        self.video_in = asyncio.Event()
        self.over = asyncio.Event()
        self.asked = False

    async def recv(self) -> str | bytes:
        if self.script:
            return self.script.pop(0)
        if not self.over.is_set() and not self.video_in.is_set() and self.ingesting:
            await wait_either(self.video_in, self.over)
        if not self.over.is_set() and not self.asked:
            self.asked = True
            return json.dumps(self.request.ask(CHAT_ID))
        await self.over.wait()
        raise Disconnected  # the request is answered (or refused): the session closes

    async def send(self, text: str) -> None:
        message = json.loads(text)
        kind = message["type"]
        if kind == "ingest_done":
            self.ingesting -= 1
            if not self.ingesting:
                self.video_in.set()
        elif kind in ("token", "answer", "error"):
            self.reply(message)
            if kind != "token":
                self.over.set()


async def wait_either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()


class ChatCompletion:
    """One request being answered: `await result()` (a chat.completion or an error), or `async for` over
    `chunks()` (server-sent events, ending with [DONE]). Made by `fresh` or `live`."""

    def __init__(self, request: ChatRequest, end: Callable[[], Awaitable[None]]):
        self.request = request
        self.events: asyncio.Queue[dict] = asyncio.Queue()  # the native token, answer and error messages
        self.end = end  # after the answer, or when the client leaves first

    @classmethod
    def fresh(cls, service: StreamService, request: ChatRequest) -> "ChatCompletion":
        """Answered by a session of its own, which its script drives (the video, then the question)."""
        async def end():
            connection.over.set()
            await asyncio.shield(task)

        completion = cls(request, end)
        connection = ScriptedConnection(request, completion.events.put_nowait)
        task = asyncio.ensure_future(service.handle(connection))
        return completion

    @classmethod
    async def live(cls, service: StreamService, request: ChatRequest, key: str) -> "ChatCompletion":
        """Answered from the memory of the open session whose key this is (the stream goes on meanwhile)."""
        session = service.session_by_key(key)
        question, max_new, _ = service.read_ask(request.ask(CHAT_ID))
        question_id = f"chat-{uuid.uuid4().hex}"  # a question of the session's, private to this request

        async def end():
            with contextlib.suppress(ProtocolError):  # over already
                session.cancel(question_id)

        completion = cls(request, end)
        await session.ask(question_id, question, max_new, send=completion.events.put_nowait)
        return completion

    async def _events(self) -> AsyncIterator[dict]:
        try:
            while True:
                event = await self.events.get()
                yield event
                if event["type"] != "token":
                    return
        finally:
            await self.end()

    async def result(self) -> tuple[int, dict]:
        async for event in self._events():
            if event["type"] == "error":
                return error_body(event["code"], event["message"])
            if event["type"] == "answer":
                return 200, dict(self._head("chat.completion"), choices=[dict(
                    index=0, message=dict(role="assistant", content=event["text"]),
                    finish_reason=self._finish(event))], usage=self._usage(event))
        return error_body("internal_error", "the session ended without an answer")

    async def chunks(self) -> AsyncIterator[str]:
        """The SSE lines of a streamed answer; an error after the first byte is an error event (the SDK raises it)."""
        yield self._sse(self._chunk(dict(role="assistant", content="")))
        async for event in self._events():
            if event["type"] == "token":
                yield self._sse(self._chunk(dict(content=event["text"])))
            elif event["type"] == "error":
                yield self._sse(error_body(event["code"], event["message"])[1])
            else:
                yield self._sse(self._chunk({}, self._finish(event)))
                if self.request.usage_chunk:
                    yield self._sse(dict(self._head("chat.completion.chunk"), choices=[], usage=self._usage(event)))
        yield "data: [DONE]\n\n"

    def _finish(self, answer: dict) -> str:
        limit = self.request.max_tokens
        return "length" if limit is not None and answer["stats"]["tokens"] >= limit else "stop"

    @staticmethod
    def _usage(answer: dict) -> dict:
        stats = answer["stats"]
        prompt = round(stats["memory_tokens"])  # the memory the answer attended to (mean over layers)
        return dict(prompt_tokens=prompt, completion_tokens=stats["tokens"], total_tokens=prompt + stats["tokens"],
                    streamer=stats)

    def _head(self, kind: str) -> dict:
        return dict(id=self.request.id, object=kind, created=self.request.created, model=self.request.model)

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return dict(self._head("chat.completion.chunk"), choices=[dict(index=0, delta=delta, finish_reason=finish)])

    @staticmethod
    def _sse(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"


async def answer(service: StreamService, authorization: list[str], body: AsyncIterator[bytes],
                 key: str | None = None) -> tuple[int, dict] | ChatCompletion:
    """POST /v1/chat/completions: (status, JSON) for a plain request or a refusal, or a ChatCompletion whose
    chunks() a transport streams (`stream: true`). `key`: the X-Streamer-Session header, a live session's
    key (its `ready` message's): the question is asked against that session's memory, with no video."""
    refused = service.refusal(authorization)
    if refused is not None:
        return error_body(refused["code"], refused["message"])
    limit, data = MAX_BODY_MESSAGES * service.limits.max_message_bytes, bytearray()
    async for piece in body:
        data += piece
        if len(data) > limit:
            return error_body("message_too_large", f"request body over this server's limit of {limit} bytes; "
                              "send fewer or smaller frames, or a video_url")
    try:
        request = read_request(read_json(data.decode("utf-8", errors="replace")), service.shared.model_name,
                               live=key is not None)
        completion = (ChatCompletion.fresh(service, request) if key is None else
                      await ChatCompletion.live(service, request, key))
    except ProtocolError as exc:
        return error_body(exc.code, str(exc))
    return completion if request.stream else await completion.result()


def models(service: StreamService, authorization: list[str]) -> tuple[int, dict]:
    """GET /v1/models: (status, JSON): the one model this server answers with, or the refusal."""
    refused = service.refusal(authorization)
    if refused is not None:
        return error_body(refused["code"], refused["message"])
    model = service.shared.model_name
    return 200, dict(object="list", data=[dict(id=model, object="model", created=0, owned_by="streamer")])
