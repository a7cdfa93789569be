"""`streamer serve`: load the model once and serve live video QA over websockets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path

from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.service.protocol import ServerLimits
from streamer.service.server import serve
from streamer.service.service import StreamService

log = logging.getLogger("streamer")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve live video QA over websockets",
                       description="Load the model once and serve sessions over websockets (protocol in README).")
    p.add_argument("--config", default="stream_default", help="TOML config for sessions' defaults")
    p.add_argument("--model", help="builtin | builtin-choice | tiny-random | a built-in architecture | a local checkpoint directory")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default: the config's, auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="directory whose videos/snapshots clients may name (repeatable); none by default")
    p.add_argument("--allow-urls", action="store_true", help="let clients make the server open network streams")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"),
                   help="bearer token clients must send (default: $STREAMER_TOKEN; none = open)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve https/wss with this certificate (with --tls-key): a browser "
                                                  "lets a page use the camera only on https or on localhost")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--max-sessions", type=int, default=16, help="sessions open at once")
    p.add_argument("--max-frames", type=int, default=100_000, help="frames per session")
    p.add_argument("--max-message-mb", type=float, default=8.0, help="largest websocket message (a frame)")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session is closed")
    p.add_argument("--max-batch", type=int, default=32,
                   help="answers of all sessions generated together, one forward per token (1: one at a time; "
                        "default 32)")
    p.add_argument("--max-together", type=int, default=8,
                   help="chunks of different sessions ingested together, their probe forwards in one forward "
                        "(1: one at a time; default 8); each holds a copy of its session's memory meanwhile")
    p.add_argument("--overflow", choices=["subsample", "drop"], default="subsample",
                   help="when frames arrive faster than they are ingested")
    ray = p.add_argument_group("Ray Serve", "serve the same protocol from model replicas on a Ray cluster "
                               "(pip install '.[ray]'); --max-sessions is then per replica")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve's proxy, one model per replica")
    ray.add_argument("--replicas", type=replicas, metavar="N|MIN-MAX",
                     help="replicas: N, or MIN-MAX autoscaled on open sessions (default: one per GPU of the "
                          "cluster, or 1 without GPUs)")
    ray.add_argument("--ray-address", help="join a running Ray cluster ('auto': the one `ray start` began on this "
                                           "machine; default: $RAY_ADDRESS, else start one here)")
    ray.add_argument("--cpus-per-replica", type=float,
                     help="without GPUs: CPUs (and torch threads) per replica (default: an equal share)")
    ray.add_argument("--drain-seconds", type=float, default=60.0,
                     help="how long a replica being stopped keeps its sessions after telling them (default 60)")
    p.set_defaults(run=run)


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror}; stop what holds it or give --port "
                             "another number") from None


def replicas(text: str) -> int | tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        counts = (int(low), int(high)) if high else (int(low),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or MIN-MAX, e.g. 4 or 1-8") from None
    if min(counts) < (0 if high else 1) or (high and counts[0] > counts[1]) or max(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need N >= 1, or 0 <= MIN <= MAX with MAX >= 1")
    return counts if high else counts[0]


def run(args) -> int:
    if args.max_batch < 1 or args.max_together < 1:
        raise ValueError(f"--max-batch and --max-together must be >= 1, got {args.max_batch} and {args.max_together}")
    config = load_config(args.config)
    override(config, "model", name=args.model, device=args.device, dtype=args.dtype)
    config.validate()
    if config.memory.recall and not config.memory.host_budget:  # else a session's host memory grows without end
        raise ValueError(f"{args.config}: memory.recall needs memory.host_budget in a served config (tokens per "
                         "layer a session's host memory may keep; without it a live stream's grows without end)")
    roots = [Path(root) for root in args.allow_root]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--allow-root {root}: no such directory")
    limits = ServerLimits(max_sessions=args.max_sessions, max_frames_per_session=args.max_frames,
                          max_message_bytes=int(args.max_message_mb * 2**20), idle_timeout=args.idle_timeout,
                          max_batch=args.max_batch, max_together=args.max_together, overflow=args.overflow, allowed_roots=roots, allow_urls=args.allow_urls, token=args.token)
    if args.ray:
        from streamer.service.ray_serve import serve_on_ray  # Ray is an optional dependency
        serve_on_ray(config, limits, args.host, args.port, args.replicas, args.ray_address, args.drain_seconds,
                     args.cpus_per_replica)
        return 0
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    if args.tls_cert:
        try:  # a bad pair is said now, in one line, not after the model has loaded
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: cannot be used ({exc})") from None
    check_port(args.host, args.port)  # before the model loads (a minute for a 7B), not after
    if args.host not in LOOPBACK and not args.token:
        log.warning("serving on %s without a token: anyone who can reach this address can use the model and read "
                    "--allow-root; give --token or set $STREAMER_TOKEN", args.host)
    runner, _ = load_runner(config)
    service = StreamService(runner, config, limits)
    asyncio.run(serve(service, args.host, args.port, tls=(args.tls_cert, args.tls_key) if args.tls_cert else None))
    return 0
