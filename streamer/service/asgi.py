"""The service (streamer.service.service) as an ASGI app, for ASGI servers: Ray Serve's proxy, uvicorn.

The same protocol as `streamer serve`: a websocket at any path but the HTTP routes is one session
(/v1/realtime: in OpenAI Realtime events); GET / is the browser page, /health reports the service,
/health/ready runs a model step, /metrics is Prometheus' text. A connection without the bearer token is refused in the
handshake with 401 and the JSON error, where the server supports ASGI's denial-response
extension (uvicorn does); elsewhere it is closed before it opens (code 1008, which a client sees
as HTTP 403).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streamer.service import chat
from streamer.service.metrics import CONTENT_TYPE
from streamer.service.page import FILES
from streamer.service.protocol import Disconnected
from streamer.service.service import StreamService, browser_token
from streamer.text import counted

log = logging.getLogger("streamer")
POLICY_VIOLATION = 1008


class AsgiConnection:
    """A Starlette WebSocket as the service's Connection."""

    def __init__(self, websocket: WebSocket):
        self.websocket = websocket

    async def recv(self) -> str | bytes:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise Disconnected
        return message["text"] if message.get("text") is not None else message.get("bytes") or b""

    async def send(self, text: str) -> None:
        try:
            await self.websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):  # closed, or the client went away mid-send
            raise Disconnected from None


def asgi_app(service: StreamService, health: Callable[[], dict] | None = None) -> Starlette:
    """The ASGI app serving `service`; `health` (default service.health) answers GET /health."""
    health = health or service.health

    async def health_route(request):
        return JSONResponse(health())

    async def ready_route(request):
        ready, report = await service.ready()
        return JSONResponse(report, status_code=200 if ready else 503)

    async def metrics_route(request):
        return Response(service.metrics.text(), media_type=CONTENT_TYPE)

    async def chat_route(request):
        service.start()
        answered = await chat.answer(service, request.headers.getlist("authorization"), request.stream(),
                                     request.headers.get("x-streamer-session"))
        if isinstance(answered, chat.ChatCompletion):
            return StreamingResponse(answered.chunks(), media_type="text/event-stream")
        status, body = answered
        return JSONResponse(body, status_code=status)

    async def models_route(request):
        status, body = chat.models(service, request.headers.getlist("authorization"))
        return JSONResponse(body, status_code=status)

    async def page_route(request):
        content_type, body = service.page.get(request.url.path)
        return Response(body, media_type=content_type)

    async def session_route(websocket: WebSocket):
        service.start()  # a server that runs no lifespan starts it here
        offered = websocket.scope.get("subprotocols", [])
        refused = service.refusal(websocket.headers.getlist("authorization"), offered)
        if refused is not None and browser_token(offered) is None:  # a browser reads the refusal once open
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(JSONResponse(refused, status_code=401))
            else:
                await websocket.close(code=POLICY_VIOLATION, reason="unauthorized")
            return
        await websocket.accept(subprotocol=browser_token(offered))
        await service.handle(AsgiConnection(websocket), websocket.url.path, refused)
        if WebSocketState.CONNECTED == websocket.client_state == websocket.application_state:
            try:  # the service ended the session (a timeout, a refused connection): close it from here
                await websocket.close()
            except (RuntimeError, OSError):  # the client closed first
                pass

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        log.info("shutting down: %s open", counted(len(service.sessions), "session"))
        await service.close()

    pages = [Route(path, page_route) for path in FILES]
    return Starlette(routes=[*pages, Route("/health", health_route), Route("/health/ready", ready_route),
                             Route("/metrics", metrics_route),
                             Route("/v1/chat/completions", chat_route, methods=["POST"]),
                             Route("/v1/models", models_route), WebSocketRoute("/{path:path}", session_route)],
                     lifespan=lifespan)
