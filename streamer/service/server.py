"""`streamer serve`: the service (streamer.service.service) on the `websockets` library's asyncio server.

Plain asyncio: the page (GET /), /health, /health/ready, /metrics and the bearer-token check are answered
in the HTTP handshake, and each accepted connection is handed to the service for its life, with its path
(/v1/realtime: OpenAI Realtime events).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamer.service.metrics import CONTENT_TYPE
from streamer.service.service import Disconnected, StreamService, browser_token

log = logging.getLogger("streamer")
JSON = "application/json"


class WebsocketConnection:
    """A websockets ServerConnection as the service's Connection."""

    def __init__(self, websocket: ServerConnection):
        self.websocket = websocket

    async def recv(self) -> str | bytes:
        try:
            return await self.websocket.recv()
        except ConnectionClosed:
            raise Disconnected from None

    async def send(self, text: str) -> None:
        try:
            await self.websocket.send(text)
        except ConnectionClosed:
            raise Disconnected from None


def subprotocols(request) -> list[str]:
    return [p.strip() for header in request.headers.get_all("Sec-WebSocket-Protocol") for p in header.split(",")]


async def serve_websockets(service: StreamService, host: str, port: int, ready: asyncio.Future | None = None,
                           stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when running in the main thread); `ready` gets the port."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    except (RuntimeError, ValueError):  # not the main thread: the caller stops us
        pass

    def respond(connection: ServerConnection, status: HTTPStatus, body: str, content_type: str = JSON):
        response = connection.respond(status, body)
        del response.headers["Content-Type"]  # websockets' Headers add a value on assignment
        response.headers["Content-Type"] = content_type
        return response

    async def process_request(connection: ServerConnection, request):
        path = request.path.split("?")[0]
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if not upgrade and (page := service.page.get(path)) is not None:
            return respond(connection, HTTPStatus.OK, page[1].decode(), page[0])
        if path == "/health":
            return respond(connection, HTTPStatus.OK, json.dumps(service.health()) + "\n")
        if path == "/health/ready":
            ready, report = await service.ready()
            return respond(connection, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                           json.dumps(report) + "\n")
        if path == "/metrics":
            return respond(connection, HTTPStatus.OK, service.metrics.text().decode(), CONTENT_TYPE)
        offered = subprotocols(request)
        refused = service.refusal(request.headers.get_all("Authorization"), offered)
        if refused is not None and browser_token(offered) is None:  # a browser reads the refusal once open
            return respond(connection, HTTPStatus.UNAUTHORIZED, json.dumps(refused) + "\n")
        return None

    async def handle(websocket: ServerConnection) -> None:
        request = websocket.request
        refused = service.refusal(request.headers.get_all("Authorization"), subprotocols(request))
        await service.handle(WebsocketConnection(websocket), request.path.split("?")[0], refused)

    service.start()
    # the hard size cap is above the soft limit so that an oversized message gets a JSON error
    async with serve(handle, host, port, process_request=process_request,
                     select_subprotocol=lambda connection, offered: browser_token(offered),
                     max_size=2 * service.limits.max_message_bytes, ping_interval=20, ping_timeout=20) as server:
        sockets = [s.getsockname() for s in server.sockets]
        log.info("serving %s on %s", service.shared.model_name, ", ".join(f"ws://{h}:{p}" for h, p, *_ in sockets))
        if ready is not None:
            ready.set_result(sockets[0][1])
        await stop.wait()
        log.info("shutting down: closing %d sessions", len(service.sessions))
        server.close(close_connections=True)
        await server.wait_closed()
    await service.close()
