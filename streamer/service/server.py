"""`streamer serve`: the service's ASGI app (streamer.service.asgi) on uvicorn.

One app for every route (the page, the native and Realtime websockets, chat completions, health, metrics),
the same app Ray Serve's replicas run. uvicorn is the HTTP server because the websockets library's server
answers only GET requests, and POST /v1/chat/completions is one; websocket frames still go through the
websockets library (uvicorn's "websockets-sansio" protocol).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading

import uvicorn

from streamer.service.asgi import asgi_app
from streamer.service.service import StreamService

log = logging.getLogger("streamer")
PING_S = 20.0  # a websocket without a pong for this long is closed (a client that vanished)


class Server(uvicorn.Server):
    """uvicorn's server, ending with exit status 0 on SIGINT/SIGTERM (uvicorn's own re-raises the signal once
    it has shut down, so the process would die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        installed = []
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: the caller stops us
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
                installed.append(sig)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


async def serve(service: StreamService, host: str, port: int, ready: asyncio.Future | None = None,
                stop: asyncio.Event | None = None, tls: tuple[str, str] | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when running in the main thread); `ready` gets the port.
    tls: (certificate, key) PEM files: https and wss instead of http and ws."""
    # the hard size cap is above the soft limit so that an oversized message gets a JSON error
    config = uvicorn.Config(asgi_app(service), host=host, port=port, lifespan="on", log_level="warning",
                            ws="websockets-sansio", ws_max_size=2 * service.limits.max_message_bytes,
                            ws_ping_interval=PING_S, ws_ping_timeout=PING_S, timeout_graceful_shutdown=5,
                            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
    server = Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():  # it could not start (uvicorn logged why)
            await serving
            raise OSError(f"could not serve on {host}:{port}")
        await asyncio.sleep(0.01)
    sockets = [s.getsockname() for listener in server.servers for s in listener.sockets]
    secure = "s" if tls else ""
    log.info("serving %s on %s (the page: http%s://%s:%d/)", service.shared.model_name,
             ", ".join(f"ws{secure}://{h}:{p}" for h, p, *_ in sockets), secure, *sockets[0][:2])
    if ready is not None:
        ready.set_result(sockets[0][1])
    if stop is not None:
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
    await serving


@contextlib.contextmanager
def serving(service: StreamService, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None):
    """`serve` on a thread with its own event loop, for programs and tests that go on meanwhile: yields the
    port, and stops the server on leaving."""
    ready: concurrent.futures.Future = concurrent.futures.Future()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run():
        started = loop.create_future()
        started.add_done_callback(lambda f: ready.set_result(f.result()))
        try:
            await serve(service, host, port, ready=started, stop=stop, tls=tls)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), name="server", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("the server did not shut down within 30 s")
