"""OpenAI's Realtime API over the native protocol: the websocket at /v1/realtime, on both transports.

A RealtimeConnection wraps a transport's connection and is itself a Connection for the service, so a
Realtime client gets the same sessions, limits, executor and refusals as a native one. Client events are
translated into native messages, native messages back into server events (README, "OpenAI Realtime"):

    session.update (session.video_memory: the native start options)   -> remembered for `start`
    conversation.item.create, input_image (a JPEG/PNG data URL)        -> `start` (once), a binary frame
    conversation.item.create, input_text                               -> remembered: the next question
    response.create                                                    -> `ask` with the texts since the last
    response.cancel                                                    -> `cancel`
    streamer.TYPE (an extension)                                       -> the native message TYPE
    native token / answer / error                  -> response.output_text.delta / response.done / error
    any other native message (progress, stats, ...)                     -> streamer.TYPE with its fields

Each answer is about the memory, as a native ask is: earlier questions and answers are not in its prompt.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from streamer.service.protocol import Disconnected, ProtocolError, parse_message

log = logging.getLogger("streamer")

REALTIME_PATH = "/v1/realtime"
EXTENSION = "streamer."  # a client event streamer.TYPE is the native message TYPE, and back
CLIENT_EVENTS = ("session.update", "conversation.item.create", "response.create", "response.cancel")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
SERVER_ERRORS = ("internal_error", "answer_failed", "ingest_failed")  # the server's fault, not the request's


@dataclass
class Response:
    """A response in flight: the native ask whose id is the response's."""

    id: str
    item_id: str
    texts: list[str] = field(default_factory=list)
    opened: bool = False  # its output item and content part were announced


class RealtimeConnection:
    """A transport's connection speaking Realtime events, as the service's Connection (native messages)."""

    def __init__(self, connection, model: str, max_message_bytes: int, check_start: Callable[[dict], None]):
        """check_start(options) raises ProtocolError for `start` options this server refuses."""
        self.connection = connection
        self.model = model
        self.max_message_bytes = max_message_bytes
        self.check_start = check_start
        self.options: dict = {}  # session.update's video_memory: the native start options
        self.max_output_tokens: int | None = None
        self.started = False  # a native start was sent (and not refused)
        self.inbox: deque[str | bytes] = deque()  # native messages for the service
        self.texts: list[str] = []  # input_text since the last response.create
        self.responses: dict[str, Response] = {}
        self.greeted = False
        self.counter = itertools.count(1)

    # --- client events in ------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        if not self.greeted:
            self.greeted = True
            await self._emit("session.created", session=self._session())
        while not self.inbox:
            message = await self.connection.recv()
            client_event = None
            try:
                if len(message) > self.max_message_bytes:
                    raise ProtocolError("message_too_large", f"event of {len(message)} bytes is over the limit of "
                                        f"{self.max_message_bytes}")
                if isinstance(message, bytes):
                    raise ProtocolError("bad_message", "Realtime events are JSON text; send an image as an "
                                        "input_image content part (a data URL)")
                event = parse_message(message)
                client_event = event.get("event_id")
                await self._receive(event)
            except ProtocolError as exc:
                await self._error(exc.code, str(exc), client_event)
            except Disconnected:
                raise
            except Exception as exc:  # a bug must cost the client one event, never the connection
                log.exception("realtime: unexpected error on a client event")
                await self._error("internal_error", f"the server failed on this event ({type(exc).__name__}); the "
                                  "connection goes on -- please report it", client_event)
        return self.inbox.popleft()

    async def _receive(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.update":
            await self._update(event.get("session"))
        elif kind == "conversation.item.create":
            await self._item(event.get("item"))
        elif kind == "response.create":
            await self._respond(event.get("response") or {})
        elif kind == "response.cancel":
            self._cancel(event.get("response_id"))
        elif kind.startswith(EXTENSION) and len(kind) > len(EXTENSION):
            native = {k: v for k, v in event.items() if k != "event_id"}
            native["type"] = kind.removeprefix(EXTENSION)
            if native["type"] == "start":
                self.started = True  # started by hand: no second start with the first image
            elif native["type"] != "ping":
                self._start()
            self.inbox.append(json.dumps(native))
        else:
            raise ProtocolError("unknown_type", f"unknown or unsupported event type {kind!r}; this server takes "
                                f"{', '.join(CLIENT_EVENTS)} and {EXTENSION}TYPE for a native message")

    async def _update(self, session) -> None:
        if not isinstance(session, dict):
            raise ProtocolError("bad_message", "session.update needs a 'session' object")
        modalities = session.get("output_modalities")
        if modalities is not None and modalities != ["text"]:
            raise ProtocolError("bad_option", f"output_modalities {modalities!r}: this server answers in text only; "
                                'send ["text"]')
        options = session.get("video_memory")
        if options is not None:
            if not isinstance(options, dict):
                raise ProtocolError("bad_option", "'video_memory' must be an object of start options")
            if self.started:
                raise ProtocolError("already_started", "the memory is already being built; set video_memory before "
                                    "the first image, or open a new connection")
            self.check_start({**options, "type": "start"})
            self.options = {k: v for k, v in options.items() if k != "type"}
        limit = session.get("max_output_tokens")
        if limit is not None:
            self.max_output_tokens = self._token_limit(limit)
        await self._emit("session.updated", session=self._session())

    async def _item(self, item) -> None:
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise ProtocolError("bad_message", "conversation.item.create takes a user message: "
                                '{"type": "message", "role": "user", "content": [...]}')
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("bad_message", "a message's 'content' must be a non-empty list of parts")
        frames, texts = [], []
        for part in content:  # all parts are checked before any is taken
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_image":
                frames.append(image_bytes(part.get("image_url")))
            elif kind == "input_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ProtocolError("bad_message", f"content part {kind!r}: this server takes input_image (a JPEG "
                                    "or PNG data URL) and input_text parts")
        if frames:
            self._start()
            self.inbox.extend(frames)
        self.texts += texts
        item_id = item.get("id") if isinstance(item.get("id"), str) else self._id("item")
        echoed = dict(id=item_id, object="realtime.item", type="message", role="user", status="completed",
                      content=[{"type": "input_image"} if p["type"] == "input_image" else p for p in content])
        await self._emit("conversation.item.added", previous_item_id=None, item=echoed)
        await self._emit("conversation.item.done", previous_item_id=None, item=echoed)

    async def _respond(self, options) -> None:
        if not isinstance(options, dict):
            raise ProtocolError("bad_message", "response.create's 'response' must be an object")
        question = "\n".join(text for text in self.texts if text.strip())
        if not question:
            raise ProtocolError("bad_question", "no question: add a conversation item with an input_text part "
                                "before response.create")
        limit = options.get("max_output_tokens")
        limit = self._token_limit(limit) if limit is not None else self.max_output_tokens
        self.texts = []
        response = Response(self._id("resp"), self._id("item"))
        self.responses[response.id] = response
        await self._emit("response.created", response=self._response(response, "in_progress"))
        self._start()
        ask = dict(type="ask", id=response.id, question=question)
        if limit is not None:
            ask["max_new_tokens"] = limit
        self.inbox.append(json.dumps(ask))

    def _cancel(self, response_id) -> None:
        if response_id is None and self.responses:
            response_id = next(reversed(self.responses))  # the newest
        if not isinstance(response_id, str) or response_id not in self.responses:
            raise ProtocolError("not_answering", f"no response {response_id!r} is in progress")
        self.inbox.append(json.dumps(dict(type="cancel", id=response_id)))

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.inbox.append(json.dumps(dict(self.options, type="start")))

    @staticmethod
    def _token_limit(value) -> int | None:
        if value == "inf":
            return None  # the server's default
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ProtocolError("bad_option", f"max_output_tokens must be a positive integer or \"inf\", got {value!r}")
        return value

    # --- native messages out ---------------------------------------------------------------

    async def send(self, text: str) -> None:
        try:
            await self._translate(json.loads(text))
        except Disconnected:
            raise
        except Exception as exc:  # the writer must go on: later answers still reach the client
            log.exception("realtime: unexpected error translating a native message")
            await self._error("internal_error", f"the server failed on a reply ({type(exc).__name__}) -- please "
                              "report it", None)

    async def _translate(self, message: dict) -> None:
        kind = message.pop("type")
        response = self.responses.get(message.get("id")) if isinstance(message.get("id"), str) else None
        if kind == "ready":
            await self._emit("session.updated", session=self._session(
                dict(self.options, session=message["session"], key=message["key"], policy=message["policy"],
                     chunk_frames=message["chunk_frames"], budget=message["budget"])))
        elif kind == "token" and response is not None:
            await self._open(response)
            response.texts.append(message["text"])
            await self._emit("response.output_text.delta", **self._where(response), delta=message["text"])
        elif kind == "answer" and response is not None:
            await self._close(response, "cancelled" if message.get("cancelled") else "completed",
                              stats=message.get("stats"))
        elif kind == "error":
            if message.get("request") == "start":
                self.started = False  # refused (e.g. too many sessions): the next event tries again
            await self._error(message["code"], message["message"], None)
            if response is not None:
                await self._close(response, "failed", error=dict(code=message["code"], message=message["message"]))
        else:
            await self._emit(EXTENSION + kind, **message)

    async def _open(self, response: Response) -> None:
        if not response.opened:
            response.opened = True
            await self._emit("response.output_item.added", response_id=response.id, output_index=0,
                             item=self._output(response, "in_progress"))
            await self._emit("response.content_part.added", **self._where(response),
                             part=dict(type="output_text", text=""))

    async def _close(self, response: Response, status: str, stats: dict | None = None,
                     error: dict | None = None) -> None:
        self.responses.pop(response.id, None)
        if status != "failed":
            await self._open(response)
            text = "".join(response.texts)
            await self._emit("response.output_text.done", **self._where(response), text=text)
            await self._emit("response.content_part.done", **self._where(response),
                             part=dict(type="output_text", text=text))
            await self._emit("response.output_item.done", response_id=response.id, output_index=0,
                             item=self._output(response, "completed" if status == "completed" else "incomplete"))
        done = self._response(response, status)
        if stats is not None:
            done["usage"] = dict(output_tokens=stats["tokens"], total_tokens=stats["tokens"])
            done["streamer"] = stats  # the native answer's stats: ttft_s, tokens_per_s, memory_tokens, ...
        if error is not None:
            done["status_details"] = dict(type="failed", error=dict(type=error_type(error["code"]), **error))
        elif status == "cancelled":
            done["status_details"] = dict(type="cancelled", reason="client_cancelled")
        await self._emit("response.done", response=done)

    async def _error(self, code: str, message: str, client_event) -> None:
        await self._emit("error", error=dict(type=error_type(code), code=code, message=message, param=None,
                                             event_id=client_event))

    # --- the shapes of server events ---------------------------------------------------------

    async def _emit(self, kind: str, **fields) -> None:
        await self.connection.send(json.dumps(dict(type=kind, event_id=self._id("event"), **fields)))

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.counter)}"

    def _session(self, video_memory: dict | None = None) -> dict:
        return dict(type="realtime", object="realtime.session", model=self.model, output_modalities=["text"],
                    max_output_tokens=self.max_output_tokens or "inf",
                    video_memory=video_memory if video_memory is not None else dict(self.options))

    def _response(self, response: Response, status: str) -> dict:
        done = status != "in_progress"
        return dict(id=response.id, object="realtime.response", status=status, status_details=None,
                    output=[self._output(response, "completed")] if done and response.opened else [],
                    output_modalities=["text"], usage=None)

    def _output(self, response: Response, status: str) -> dict:
        content = [dict(type="output_text", text="".join(response.texts))] if status != "in_progress" else []
        return dict(id=response.item_id, object="realtime.item", type="message", role="assistant", status=status,
                    content=content)

    @staticmethod
    def _where(response: Response) -> dict:
        return dict(response_id=response.id, item_id=response.item_id, output_index=0, content_index=0)


def error_type(code: str) -> str:
    return "server_error" if code in SERVER_ERRORS else "invalid_request_error"


def image_bytes(url) -> bytes:
    """The JPEG/PNG bytes of an input_image's data URL (the pixel limit is checked as for any pushed frame)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ProtocolError("bad_image", "an input_image must be a data URL (data:image/jpeg;base64,...); this "
                            "server fetches no image URLs")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or header[5:-7].lower() not in ("image/jpeg", "image/jpg", "image/png"):
        raise ProtocolError("bad_image", f"an input_image must be a base64 JPEG or PNG data URL, not "
                            f"{header[:60]!r}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_image", "the input_image's data URL is not valid base64") from None
    if not data.startswith(IMAGE_MAGIC):
        raise ProtocolError("bad_image", "the input_image's data is not a JPEG or PNG image")
    return data
