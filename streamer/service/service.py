"""The service a transport serves: sessions, the protocol's dispatch, the health report, the token check.

One connection is one session: JSON text messages carry commands, binary messages carry JPEG/PNG
frames (protocol in README.md, "Websocket protocol"). Every refusal is a JSON error with a stable
code, and the connection stays open wherever it can. Model work runs on the ModelExecutor's thread
(answers of all sessions stepped together); image decoding runs on worker threads; the event loop
only routes messages.

Nothing here knows the transport: a transport (streamer.service.server for the websockets library,
streamer.service.asgi for ASGI servers such as Ray Serve) hands each connection over as a
Connection and answers /health, /health/ready, /metrics and refused tokens from health(), ready(),
metrics.text() and refusal().
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from memory.registry import POLICIES
from streamer.config import Config
from streamer.engine.models import model_identity
from streamer.engine.runner import DEFAULT_FPS, Runner
from streamer.service.executor import ASK, ModelExecutor
from streamer.service.metrics import Metrics
from streamer.service.protocol import (MESSAGE_TYPES, Disconnected, ProtocolError, ServerLimits, error, number,
                                       parse_message, refused, session_config)
from streamer.service.page import Page
from streamer.service.realtime import REALTIME_PATH, RealtimeConnection
from streamer.service.session import Shared, StreamSession
from streamer.text import counted
from video_io.images import decode_image
from video_io.sampling import Sampling
from video_io.sources import FileSource, StreamSource

log = logging.getLogger("streamer")

URL_SCHEMES = ("rtsp", "rtmp", "http", "https", "srt", "udp")
MAX_PATH_CHARS = 4096
MAX_RECONNECTS = 100  # an ingest's `reconnect`: a reader must not retry a dead source forever
READY_TIMEOUT_S = 30.0  # /health/ready: a model step must run within this (it waits behind at most one layer)


BROWSER_TOKEN = "bearer."  # a websocket subprotocol `bearer.TOKEN` carries a browser's token


def browser_token(subprotocols: list[str]) -> str | None:
    """The `bearer.TOKEN` subprotocol a browser offered, which the server must select to accept it, else None."""
    return next((p for p in subprotocols if p.startswith(BROWSER_TOKEN)), None)


class Connection(Protocol):
    """One client connection as a transport hands it to the service."""

    async def recv(self) -> str | bytes: ...  # the next message; raises Disconnected

    async def send(self, text: str) -> None: ...  # raises Disconnected


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


LIBC = _libc()


def give_memory_back() -> None:
    """Free what a closed session left in reference cycles, then return freed heap memory to the OS:
    glibc keeps large freed blocks (decoded frames, a session's memory) in its heap, so without this
    the server's RSS stays at its peak."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def decode_frame(data: bytes, session: StreamSession, max_pixels: int):
    """A pushed JPEG/PNG -> (frame at the session's model resolution, size as sent); runs on a worker thread."""
    try:
        image = decode_image(data, max_pixels)
    except ValueError as exc:
        raise ProtocolError("bad_image", f"the binary message is not a readable JPEG/PNG image: {exc}") from None
    return session.model_frame(image)


class StreamService:
    def __init__(self, runner: Runner, defaults: Config, limits: ServerLimits, name: str = ""):
        """name: a prefix for session ids, so that sessions of several replicas have distinct ids."""
        if defaults.video.total_pixels is not None:
            raise ValueError("video.total_pixels shares a pixel budget among a video's frames, and a live stream's "
                             "frame count is not known: leave it unset for the server (set max_pixels instead)")
        self.limits = limits
        self.defaults = defaults
        self.roots = [root.resolve() for root in limits.allowed_roots]
        self.metrics = Metrics(self)
        self.shared = Shared(runner=runner, executor=ModelExecutor(runner, limits.max_batch, self.metrics,
                                                                          limits.max_together),
                             metrics=self.metrics, limits=limits, defaults=defaults, model_name=runner.model_name,
                             identity=model_identity(runner.model, runner.model_name), name=name)
        self.sessions: dict[str, StreamSession] = {}
        self.page = Page(self.page_info())
        self.unstarted = 0  # open connections that have not started a session yet
        self.collecting = self.collect_again = False  # give_memory_back running / wanted once more after it
        self.draining: str | None = None  # why new sessions are refused, once drain() was called

    # --- what a transport answers itself: health and the bearer token --------------------------

    def health(self) -> dict:
        return dict(status="draining" if self.draining else "ok", model=self.shared.model_name,
                    sessions=len(self.sessions), max_sessions=self.limits.max_sessions,
                    queued_jobs=self.shared.executor.waiting(), answers_generating=self.shared.executor.generating())

    async def ready(self, timeout: float = READY_TIMEOUT_S) -> tuple[bool, dict]:
        """(ready?, report): ready when a real model step (one token through every layer) runs within
        `timeout` seconds, queued as a question's work; not while draining."""
        report = dict(model=self.shared.model_name, sessions=len(self.sessions))
        if self.draining is not None:
            return False, dict(report, status="draining", message=self.draining)
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.shared.executor.submit(ASK, self.shared.runner.check_step), timeout)
        except TimeoutError:
            return False, dict(report, status="busy", message=f"a model step did not run within {timeout:g} s")
        except Exception as exc:
            log.exception("the readiness step failed")
            return False, dict(report, status="failed", message=f"a model step failed: {exc}")
        return True, dict(report, status="ready", step_s=round(time.perf_counter() - started, 4))

    def page_info(self) -> dict:
        """What the browser page needs to know about this server (streamer.service.page)."""
        memory = self.defaults.memory
        return dict(model=self.shared.model_name, policies=list(POLICIES), policy=memory.policy,
                    chunk_frames=memory.chunk_frames, budget=min(memory.budget or self.limits.max_budget,
                                                                 self.limits.max_budget),
                    fps=self.defaults.video.fps or DEFAULT_FPS, token=self.limits.token is not None,
                    files=bool(self.roots), max_new_tokens=self.limits.max_new_tokens,
                    max_frame_pixels=self.limits.max_frame_pixels)

    def refusal(self, authorization: list[str], subprotocols: list[str] = ()) -> dict | None:
        """The error for a connection that does not carry the token, else None. The token comes in exactly one
        `Authorization: Bearer TOKEN` header, or, from a browser (which cannot set headers on a websocket), as
        the offered subprotocol `bearer.TOKEN` (browser_token); never in the URL."""
        if self.limits.token is None:
            return None
        offered = browser_token(subprotocols)
        if authorization or offered is None:
            header = authorization[0] if len(authorization) == 1 else ""  # none, or several: refused alike
            given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        else:
            given = offered.removeprefix(BROWSER_TOKEN)
        if given is None or not hmac.compare_digest(given.encode(), self.limits.token.encode()):
            return error("unauthorized", "a valid bearer token is required: send 'Authorization: Bearer TOKEN' "
                         "(a browser page: enter the server's token)")
        return None

    # --- one connection ----------------------------------------------------------------------

    async def handle(self, connection: Connection, path: str = "/", refusal: dict | None = None) -> None:
        """Serve one connection until it closes. `path` chooses the message format: OpenAI Realtime events at
        /v1/realtime (streamer.service.realtime), the native protocol elsewhere. `refusal`: an error to send
        before closing (a browser's wrong token, which it can read only once the websocket is open)."""
        if path == REALTIME_PATH:
            connection = RealtimeConnection(connection, self.shared.model_name, self.limits.max_message_bytes,
                                            lambda options: session_config(self.defaults, options, self.limits))
        outbox: asyncio.Queue = asyncio.Queue()
        writer = asyncio.create_task(self._write(connection, outbox))
        send = outbox.put_nowait
        session: StreamSession | None = None
        frame_ts: float | None = None
        if refusal is None and self.unstarted >= self.limits.max_unstarted:
            refusal = error("too_many_connections", f"{self.unstarted} connections are open without a session; "
                            "try again later")
        if refusal is not None:
            send(refusal)
            outbox.put_nowait(None)
            await writer
            return
        self.unstarted += 1
        try:
            while True:
                timeout = self.limits.idle_timeout if session is not None else self.limits.start_timeout
                try:
                    message = await asyncio.wait_for(connection.recv(), timeout=timeout)
                except TimeoutError:
                    if session is None:
                        send(error("start_timeout", f"no start message within {timeout:g} s; the connection "
                                   "is closed"))
                        break
                    if session.busy():  # e.g. a long server-side ingest
                        continue
                    send(error("idle_timeout", f"no message for {timeout:g} s; the session is closed"))
                    break
                try:
                    if len(message) > self.limits.max_message_bytes:
                        raise ProtocolError("message_too_large", f"message of {len(message)} bytes is over the "
                                            f"limit of {self.limits.max_message_bytes}")
                    if isinstance(message, bytes):
                        if session is None:
                            raise ProtocolError("not_started", "send a start message before frames")
                        image, shape = await asyncio.to_thread(decode_frame, message, session,
                                                               self.limits.max_frame_pixels)
                        await session.add_frame(image, shape, frame_ts)
                        frame_ts = None
                        continue
                    request = parse_message(message)
                    kind = request["type"]
                    if kind == "start":
                        if session is not None:
                            raise ProtocolError("already_started", f"this connection is session {session.id} already")
                        session = self._start(request, send)
                        self.unstarted -= 1
                    elif kind == "ping":
                        send(dict(type="pong", time=time.time()))
                    elif session is None:
                        raise ProtocolError("not_started", f"send a start message before {kind!r}")
                    elif kind == "frame":
                        frame_ts = number(request, "ts", minimum=0.0)
                    else:
                        await self._dispatch(session, kind, request, send)
                except ProtocolError as exc:  # named by the message it refuses: an ask's id, the request's type
                    send(error(exc.code, str(exc), **refused(message)))
                except Disconnected:
                    raise
                except Exception as exc:  # a bug must cost the client one message, never the connection (1011)
                    log.exception("session %s: unexpected error on a message", session.id if session else "-")
                    send(error("internal_error", f"the server failed on this message ({type(exc).__name__}); "
                               "the connection goes on -- please report it", **refused(message)))
        except Disconnected:
            pass
        finally:
            if session is None:
                self.unstarted -= 1
            else:
                self.sessions.pop(session.id, None)
                await session.close()
                log.info("session %s closed (%s open)", session.id, counted(len(self.sessions), "session"))
                session = None  # this frame's reference too, before the collection
                await self._give_memory_back()
            outbox.put_nowait(None)
            await writer

    async def _write(self, connection: Connection, outbox: asyncio.Queue) -> None:
        """The only sender of a connection: messages leave in the order they were queued."""
        while (message := await outbox.get()) is not None:
            try:
                await connection.send(json.dumps(message))
            except Disconnected:
                return

    def read_ask(self, request: dict) -> tuple[str, int, bool]:
        """An ask's (question, max_new_tokens, ignore_eos), within the limits."""
        question = request.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ProtocolError("bad_question", "'question' must be a non-empty string")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("bad_question", "'question' holds a lone surrogate (not valid Unicode text)") from None
        if len(question) > self.limits.max_question_chars:
            raise ProtocolError("bad_question", f"question of {len(question)} characters is over the limit of "
                                f"{self.limits.max_question_chars}")
        max_new = number(request, "max_new_tokens", 1, self.limits.max_new_tokens, integer=True,
                         default=self.defaults.generation.max_new_tokens)
        ignore_eos = request.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ProtocolError("bad_option", "'ignore_eos' must be true or false")
        return question, max_new, ignore_eos

    def session_by_key(self, key: str) -> StreamSession:
        """The open session whose `key` (from its `ready`) this is: how a chat request asks a live memory."""
        for session in self.sessions.values():
            if hmac.compare_digest(session.key.encode(), key.encode()):
                return session
        raise ProtocolError("not_found", "no open session has this key (the `key` of its `ready` message); it may "
                            "have closed")

    def _start(self, request: dict, send) -> StreamSession:
        if self.draining is not None:
            raise ProtocolError("draining", f"{self.draining}: this server takes no new sessions; reconnect "
                                "(a load balancer sends the new connection elsewhere)")
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError("too_many_sessions", f"the server is at its limit of {self.limits.max_sessions} "
                                "sessions; try again later")
        config = session_config(self.defaults, request, self.limits)
        session = StreamSession(self.shared, config, send)
        self.sessions[session.id] = session
        log.info("session %s started (%s, %s open)", session.id, config.memory.policy,
                 counted(len(self.sessions), "session"))
        send(dict(type="ready", session=session.id, key=session.key, model=self.shared.model_name,
                  policy=config.memory.policy,
                  chunk_frames=config.memory.chunk_frames, budget=session.memory.budget,
                  limits=dict(max_frames=self.limits.max_frames_per_session,
                              max_message_bytes=self.limits.max_message_bytes,
                              max_new_tokens=self.limits.max_new_tokens,
                              max_pending_frames=session.max_pending)))
        return session

    async def _dispatch(self, session: StreamSession, kind: str, request: dict, send) -> None:
        if kind == "ask":
            await session.ask(request.get("id"), *self.read_ask(request))
        elif kind == "cancel":
            session.cancel(request.get("id"))
        elif kind == "ingest":
            self._ingest(session, request)
        elif kind == "flush":
            session.flush()
        elif kind == "stats":
            send(session.stats())
        elif kind in ("save", "load"):
            path = self._allowed_path(request.get("path"), for_writing=kind == "save")
            if kind == "save" and path.is_dir():
                raise ProtocolError("bad_option", f"{request['path']!r} is a directory; give a file name to save to")
            if kind == "save" and not path.parent.is_dir():
                raise ProtocolError("bad_option", f"no folder {str(path.parent)!r} to save {request['path']!r} in; "
                                    "create it first or give a path in an existing folder")
            if kind == "load" and not path.is_file():
                raise ProtocolError("not_found", f"no snapshot file at {request['path']!r} under the allowed roots")
            try:
                send(await (session.save(path) if kind == "save" else session.load(path)))
            except (ValueError, OSError) as exc:  # a damaged or foreign file, a full disk, a vanished file
                raise ProtocolError("bad_snapshot", str(exc)) from None
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}; known: {', '.join(MESSAGE_TYPES)}")

    def _ingest(self, session: StreamSession, request: dict) -> None:
        source = request.get("source")
        if not isinstance(source, str) or not source:
            raise ProtocolError("bad_option", "'source' must be a file path or a stream URL")
        fps = number(request, "fps", minimum=1e-3)
        frames = number(request, "frames", minimum=1, integer=True)
        max_frames = number(request, "max_frames", minimum=1, integer=True)
        if fps is not None and frames is not None:
            raise ProtocolError("bad_option", "give 'fps' or 'frames', not both")
        scheme = urlparse(source).scheme.lower()
        read_timeout = number(request, "read_timeout", minimum=0.1, maximum=600.0)
        reconnect = number(request, "reconnect", minimum=0, maximum=MAX_RECONNECTS, integer=True, default=0)
        if scheme in URL_SCHEMES:
            if not self.limits.allow_urls:
                raise ProtocolError("urls_disabled", "this server does not open network streams (start it with "
                                    "--allow-urls); send frames instead")
            session.fps = fps or session.fps
            session.start_reader(lambda: StreamSource(source, fps=fps, max_frames=max_frames, read_timeout=read_timeout,
                                                      reconnect=reconnect), live=True, label=source)
            return
        if read_timeout is not None or reconnect:
            raise ProtocolError("bad_option", "'read_timeout' and 'reconnect' are for stream URLs; a file is read whole")
        if scheme and len(scheme) > 1:  # file:, data:, ... (one letter is a Windows drive)
            raise ProtocolError("forbidden_path", f"source scheme {scheme!r} is not allowed; give a path under the "
                                "allowed roots or a stream URL")
        path = self._allowed_path(source, for_writing=False)
        if not path.is_file():
            raise ProtocolError("not_found", f"no video file at {source!r} under the allowed roots")
        sampling = Sampling(frames=frames, fps=None if frames else (fps or 1.0), max_frames=max_frames)

        def open_file():  # on the reader thread: opening a file reads its packet table
            file = FileSource(path, sampling)
            session.fps = file.sampled_fps  # before any of its frames is queued
            return iter(file)

        session.start_reader(open_file, live=False, label=source)

    def _allowed_path(self, value, for_writing: bool) -> Path:
        """A path inside one of the allowed roots (after resolving links and '..'), or a refusal.
        Paths the OS would refuse (a NUL byte, too long, a name over 255 bytes) are refused here."""
        if not isinstance(value, str) or not value:
            raise ProtocolError("bad_option", "'path' must be a non-empty string")
        if "\0" in value or len(value) > MAX_PATH_CHARS:
            raise ProtocolError("bad_option", f"'path' must have no NUL byte and at most {MAX_PATH_CHARS} characters")
        if not self.roots:
            raise ProtocolError("forbidden_path", "this server allows no server-side files (start it with "
                                "--allow-root DIR)")
        path = Path(value)
        try:
            if path.is_absolute():
                resolved = path.resolve()
            else:  # relative to a root: the first where it exists, else the first root
                options = [(root / path).resolve() for root in self.roots]
                resolved = next((option for option in options if option.exists()), options[0])
            resolved.exists()  # raises for what the OS cannot look up (e.g. a name over 255 bytes)
        except (OSError, ValueError) as exc:
            raise ProtocolError("bad_option", f"'path' cannot be used: {exc}") from None
        target = resolved.parent if for_writing else resolved
        if not any(target.is_relative_to(root) for root in self.roots):
            raise ProtocolError("forbidden_path", f"{value!r} is outside the allowed roots")
        return resolved

    async def _give_memory_back(self) -> None:
        """give_memory_back once for a burst of closing sessions, not once each: a full collection holds the GIL
        for ~0.2 s, and 64 sessions closing at once kept new connections' handshakes waiting past 10 s."""
        if self.collecting:
            self.collect_again = True  # the running one may have started before this session let go
            return
        self.collecting = True
        try:
            while True:
                self.collect_again = False
                await asyncio.to_thread(give_memory_back)
                if not self.collect_again:
                    return
        finally:
            self.collecting = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread's executor on the running event loop (before the first connection; once)."""
        self.shared.executor.start()

    def drain(self, reason: str, seconds: float) -> None:
        """Refuse new sessions and tell each open one that it has `seconds` left: time to save its memory
        and reconnect (a transport calls this when its replica is being stopped)."""
        if self.draining is not None:
            return
        self.draining = reason
        log.info("draining: %s; telling %s", reason, counted(len(self.sessions), "session"))
        for session in self.sessions.values():
            session.send(dict(type="draining", seconds=seconds, message=f"{reason}: this connection closes within "
                              f"{seconds:g} s; save the memory now if it is needed, reconnect and load it"))

    async def close(self) -> None:
        await self.shared.executor.close()
