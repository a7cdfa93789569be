"""`streamer serve --ray`: the service on Ray Serve, one model replica per GPU (or a share of the CPUs).

Each replica of the StreamReplica deployment loads the model once and runs the service's ASGI app
(streamer.service.asgi): the same protocol, limits and token check as `streamer serve`. Serve's
proxy keeps a websocket on the replica that accepted it for the connection's life, so a session
and its memory stay on one replica. A replica takes at most `max_sessions` open requests (Serve's
max_ongoing_requests; a websocket is one from its handshake on): a full replica turns a new one
away inside Serve, whose router then tries another, so a connection is never refused while some
replica has room (Serve's router alone spreads a burst of connections at random). When every
replica is full, a new connection waits in the proxy's queue until a session ends, and so does a
GET /health (Serve's own /-/healthz answers at once).

Serve tells a replica nothing when it starts stopping it (a scale-down, a redeploy): it waits up
to graceful_shutdown_timeout_s for open requests, our websockets, then kills it. So each replica
looks up its own state every POLL_S seconds and, once it is STOPPING, tells its sessions how long
they have (a `draining` message): time to save the memory, reconnect (the proxy picks a running
replica) and load it there. That lookup goes through the Serve controller's details, read with
a private client call (the public serve.status() counts replicas but does not name them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
import urllib.request
from dataclasses import replace

import ray
import torch
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeInstanceDetails

from streamer.config import Config
from streamer.engine.runner import load_runner
from streamer.service.asgi import asgi_app
from streamer.service.protocol import ServerLimits
from streamer.service.service import StreamService
from streamer.text import counted

log = logging.getLogger("streamer")

APP = "streamer"
DEPLOYMENT = "StreamReplica"
POLL_S = 2.0  # how often a replica looks up its own state (for drains) and the others' (for /health)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class StreamReplica:
    async def __init__(self, config: Config, limits: ServerLimits, threads: int | None, drain_s: float):
        if threads is not None:  # a CPU replica uses its share of the machine's cores
            torch.set_num_threads(threads)
        runner, _ = await asyncio.to_thread(load_runner, config)
        context = serve.get_replica_context()
        self.replica, self.app_name = context.replica_tag, context.app_name  # (the wrapper owns `app`)
        self.service = StreamService(runner, config, limits, name=f"{self.replica}-")
        self.drain_s = drain_s
        self.replicas: list[dict] = []  # every replica of the deployment: id and state, as of the last lookup
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    def __serve_build_asgi_app__(self):
        return asgi_app(self.service, health=self.health)

    def health(self) -> dict:
        return dict(self.service.health(), transport="ray", replica=self.replica, replicas=self.replicas)

    async def _watch(self) -> None:
        while True:
            try:
                self.replicas = await asyncio.to_thread(replica_states, self.app_name)
            except Exception as exc:  # e.g. a Ray release whose controller answers differently
                if self.service.draining is None:
                    log.warning("replica %s cannot look up replica states (%s): sessions get no drain notice",
                                self.replica, exc)
                return
            own = [r["state"] for r in self.replicas if r["replica"] == self.replica]
            if own in ([], ["STOPPING"]):  # being stopped, or its application is being deleted
                self.service.drain(f"replica {self.replica} is being stopped", self.drain_s)
                return
            await asyncio.sleep(POLL_S)


def replica_states(app: str = APP) -> list[dict]:
    """Every replica of the application's deployment (id, state, node); none while it is being deleted."""
    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    application = details.applications.get(app)
    deployment = application.deployments.get(DEPLOYMENT) if application is not None else None
    replicas = deployment.replicas if deployment is not None else []
    return [dict(replica=r.replica_id, state=r.state.value, node=r.node_ip) for r in replicas]


def application(config: Config, limits: ServerLimits, replicas: int | tuple[int, int] | None = None,
                drain_s: float = 60.0, cpus_per_replica: float | None = None):
    """The Serve application: `replicas` fixed, or (min, max) autoscaled on open sessions per replica;
    None: one per GPU of the cluster, or one on a cluster without GPUs.

    With GPUs each replica takes one (Ray sets its CUDA_VISIBLE_DEVICES); without, each takes
    `cpus_per_replica` CPUs (default an equal share of the cluster's among the most replicas) and as
    many torch threads."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if replicas is None:
        replicas = max(gpus, 1)
    most = replicas[1] if isinstance(replicas, tuple) else replicas
    if gpus:
        actor = dict(num_gpus=1, num_cpus=cpus_per_replica or 1)
        config = replace(config, model=replace(config.model, device="cuda"))
        threads = None
    else:
        share = cpus_per_replica or resources.get("CPU", 1) / most
        actor = dict(num_cpus=share)
        config = replace(config, model=replace(config.model, device="cpu"))
        threads = max(1, int(share))
    options = dict(ray_actor_options=actor, graceful_shutdown_timeout_s=drain_s, graceful_shutdown_wait_loop_s=1.0,
                   max_ongoing_requests=limits.max_sessions)
    if isinstance(replicas, tuple):
        options["autoscaling_config"] = dict(
            min_replicas=replicas[0], max_replicas=replicas[1],
            target_ongoing_requests=max(1.0, 0.75 * limits.max_sessions))  # room for a burst before it scales
    else:
        options["num_replicas"] = replicas
    return StreamReplica.options(**options).bind(config, limits, threads, drain_s)


def start_serve(host: str, port: int, address: str | None = None) -> None:
    """Start (or join, address="auto"; default $RAY_ADDRESS) a Ray cluster and Serve's proxy on host:port."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from machines without network
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options=dict(host=host, port=port))


def wait_until_routed(url: str, count: int, stall: float = 300.0) -> None:
    """Wait until `count` replicas run and the proxy at `url` (http://host:port) sends requests to each:
    it learns of a new replica a moment after the controller reports it running.

    Gives up only after `stall` seconds in which nothing changed (replica states, replicas answering):
    on a loaded machine a replica's start takes minutes but keeps moving, which a fixed deadline
    would mistake for a failure."""
    def answering() -> set[str]:
        return {json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())["replica"]
                for _ in range(4 * count)}

    seen, since, last = None, time.monotonic(), None
    while True:
        now_seen = None
        try:  # Serve or its proxy may not be up yet
            states = sorted(r["state"] for r in replica_states())
            now_seen = (tuple(states), None)
            if states.count("RUNNING") == count:
                routed = answering()
                now_seen = (tuple(states), len(routed))
                if len(routed) == count:
                    return
        except Exception as exc:
            last = exc
        if now_seen is not None and now_seen != seen:
            seen, since = now_seen, time.monotonic()
        if time.monotonic() - since > stall:
            raise TimeoutError(f"{counted(count, 'replica')} were not all running and routed to: nothing changed "
                               f"for {stall:.0f} s (replicas: {', '.join(seen[0]) if seen else 'none'})"
                               + (f"; last error: {last}" if last else ""))
        time.sleep(0.5)


def serve_on_ray(config: Config, limits: ServerLimits, host: str, port: int, replicas=None,
                 address: str | None = None, drain_s: float = 60.0, cpus_per_replica: float | None = None,
                 stop: threading.Event | None = None) -> None:
    """Start (or join) a Ray cluster, run the application behind Serve's proxy on host:port, and serve
    until `stop` is set or SIGINT/SIGTERM; then shut Serve down."""
    start_serve(host, port, address)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():  # after ray.init, which sets its own handlers
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    serve.run(application(config, limits, replicas, drain_s, cpus_per_replica), name=APP, route_prefix="/")
    states = replica_states()
    log.info("serving %s on ws://%s:%d through Ray Serve: %d replicas (%s)", config.model.name, host, port,
             len(states), ", ".join(f"{r['replica']} on {r['node']}" for r in states))
    stop.wait()
    log.info("shutting down Serve")
    serve.shutdown()
