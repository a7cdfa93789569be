"""The service on Ray Serve: two replicas of the built-in model behind Serve's proxy on a local Ray
cluster, shared by this module's tests (the cluster and its replicas take ~15 s to start), each
compared with the standalone websockets server on the same model and frames."""

import asyncio
import base64
import json
import threading
import time
import urllib.request
from dataclasses import replace

import pytest
import ray
from ray import serve
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from test_server import hostile_limits, png, refuse_hostile_inputs, running_server

from streamer.builtin.videos import make_video
from streamer.cli import main
from streamer.cli.bench_serve import free_port
from streamer.config import load_config, override
from streamer.engine.runner import load_runner
from streamer.service.client import ServerError, StreamerClient
from streamer.service.ray_serve import (APP, DEPLOYMENT, application, replica_states, serve_on_ray,
                                         wait_until_routed)

pytestmark = pytest.mark.slow

SESSIONS = 8
DRAIN_S = 10.0


def replica_config():
    config = load_config("stream_default")
    override(config, "model", name="builtin", device="cpu", dtype="float32")
    override(config, "memory", chunk_frames=8)
    override(config, "generation", max_new_tokens=8)
    return config.validate()


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url.replace("ws://", "http://") + "/health", timeout=30).read())


def routed_to(url: str, count: int) -> None:
    wait_until_routed(url.replace("ws://", "http://"), count)


@pytest.fixture(scope="module")
def cluster(clip):
    """`streamer serve --ray`'s entry (serve_on_ray) on a thread, with 2 replicas of one CPU each."""
    # a CPU more than the two replicas take, for the token test's third one
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=256 * 2**20)
    limits = hostile_limits(clip)
    limits.max_sessions = SESSIONS // 2 + 1
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve_on_ray, args=(replica_config(), limits, "127.0.0.1", port, 2),
                              kwargs=dict(drain_s=DRAIN_S, cpus_per_replica=1.0, stop=stop), daemon=True)
    thread.start()
    url = f"ws://127.0.0.1:{port}"
    routed_to(url, 2)
    try:
        yield url, limits
    finally:
        stop.set()
        thread.join(timeout=60)
        ray.shutdown()


@pytest.fixture(scope="module")
def standalone(cluster):
    """The websockets server on the same model, config and limits (room for all sessions: it is one)."""
    runner, _ = load_runner(replica_config())
    limits = replace(cluster[1], max_sessions=SESSIONS)
    with running_server(runner, limits, replica_config()) as (_, url):
        yield url


def video(seed: int):
    synthetic = make_video(seed, 24)
    return synthetic.frames(), synthetic.questions()[0].question


async def one_session(url: str, seed: int) -> tuple[str, str]:
    """(session id, answer) for video `seed` pushed as lossless PNG, then its first question."""
    frames, question = video(seed)
    async with StreamerClient(url) as client:
        ready = await client.start()
        for i, image in enumerate(frames):
            await client.send_frame(png(image), ts=i * 0.5)
        await client.flush()
        await client.wait_ingested()
        return ready["session"], (await client.ask(question))["text"]


def replica_of(session: str) -> str:
    return session.split("-")[0]


def test_concurrent_sessions_spread_over_replicas_and_answer_as_the_standalone_server(cluster, standalone):
    async def sessions(url):
        return await asyncio.gather(*[one_session(url, seed) for seed in range(SESSIONS)])

    started = time.perf_counter()
    through_serve = asyncio.run(sessions(cluster[0]))
    seconds = time.perf_counter() - started
    alone = asyncio.run(sessions(standalone))
    assert [answer for _, answer in through_serve] == [answer for _, answer in alone]
    assert any(answer for _, answer in alone)  # the built-in model says something about its videos
    assert len({replica_of(session) for session, _ in through_serve}) == 2, through_serve
    report = health(cluster[0])
    assert report["transport"] == "ray" and [r["state"] for r in report["replicas"]] == ["RUNNING"] * 2
    http = cluster[0].replace("ws://", "http://")
    metrics = urllib.request.urlopen(http + "/metrics", timeout=30).read().decode()  # a replica's own numbers
    assert "streamer:time_to_first_token_seconds_count" in metrics and "streamer:batch_size_bucket" in metrics
    ready = json.loads(urllib.request.urlopen(http + "/health/ready", timeout=60).read())
    assert ready["status"] == "ready"
    print(f"{SESSIONS} sessions through Serve in {seconds:.1f} s")


def test_the_page_and_chat_completions_work_through_serve(cluster, standalone):
    """The routes of issue 34 are the same ASGI app's: the page at /, and a streamed chat completion over frames
    answered as the standalone server answers it."""
    openai = pytest.importorskip("openai")
    frames, question = video(3)
    messages = [dict(role="user", content=[*[dict(type="image_url", image_url=dict(
        url="data:image/png;base64," + base64.b64encode(png(image)).decode())) for image in frames[:8]],
        dict(type="text", text=question)])]

    def answer(url):
        client = openai.OpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key="k", max_retries=0)
        chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    page = urllib.request.urlopen(cluster[0].replace("ws://", "http://") + "/", timeout=30).read().decode()
    assert '<script id="server-info"' in page and "{{SERVER_INFO}}" not in page
    assert answer(cluster[0]) == answer(standalone)


def test_hostile_inputs_are_refused_through_serve_as_by_the_standalone_server(cluster, standalone, clip):
    through_serve = asyncio.run(refuse_hostile_inputs(cluster[0], clip))
    assert through_serve == asyncio.run(refuse_hostile_inputs(standalone, clip))


def test_the_token_is_checked_through_serve_as_by_the_standalone_server(cluster):
    """A second application behind the same proxy, with a token: refused in the handshake with 401 and the
    JSON error, whatever is wrong with the header; accepted with it."""
    url, limits = cluster
    guarded = application(replica_config(), replace(limits, token="secret"), 1, DRAIN_S, cpus_per_replica=1.0)
    serve.run(guarded, name="guarded", route_prefix="/guarded")

    async def scenario():
        refusals = []
        for attempt in (dict(), dict(additional_headers={"Authorization": "Bearer guess"}),
                        dict(additional_headers=[("Authorization", "Bearer secret")] * 2),
                        dict(uri=url + "/guarded/?token=secret")):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(attempt.pop("uri", url + "/guarded/"), **attempt):
                    pass
            refusals.append(refused.value.response)
        async with StreamerClient(url + "/guarded/", token="secret") as client:
            session = (await client.start())["session"]
        return refusals, session

    try:
        refusals, session = asyncio.run(scenario())
    finally:
        serve.delete("guarded")
    for response in refusals:
        assert response.status_code == 401 and json.loads(response.body)["code"] == "unauthorized"
    assert "-s" in session  # a replica's session


def test_when_every_replica_is_full_a_new_connection_waits_for_a_session_to_end(cluster):
    url, limits = cluster

    async def scenario():
        full = 2 * limits.max_sessions
        clients = [await StreamerClient(url).__aenter__() for _ in range(full)]
        sessions = [(await client.start())["session"] for client in clients]
        waiting = asyncio.create_task(StreamerClient(url).__aenter__())
        await asyncio.sleep(3)
        queued = not waiting.done()  # the handshake waits in Serve's proxy, refused by neither replica
        await clients[0].close()
        late = await asyncio.wait_for(waiting, 30)
        session = (await late.start())["session"]
        for client in (late, *clients[1:]):
            await client.close()
        return sessions, queued, session

    sessions, queued, session = asyncio.run(scenario())
    replicas = [replica_of(s) for s in sessions]
    assert len(set(replicas)) == 2 and replicas.count(replicas[0]) == len(sessions) // 2  # 5 on each
    assert queued and replica_of(session) == replica_of(sessions[0])  # the slot that was freed


async def one_per_replica(url: str, frames) -> tuple[list[StreamerClient], list[str]]:
    """Two clients with `frames` ingested, whose sessions are on different replicas. Serve's router
    places a connection by its cached count of each replica's open requests, which lags sessions
    that just ended, so a connection that lands beside the first is closed and tried again."""
    clients, sessions = [], []
    for _ in range(60):  # 20 tries (10 s) once all landed beside the first, with another process on the cores
        client = await StreamerClient(url).__aenter__()
        session = (await client.start())["session"]
        if sessions and replica_of(session) == replica_of(sessions[0]):
            await client.close()
            await asyncio.sleep(0.5)
            continue
        clients.append(client)
        sessions.append(session)
        if len(clients) == 2:
            break
    assert len(clients) == 2, sessions
    for client in clients:
        for i, image in enumerate(frames):
            await client.send_frame(png(image), ts=i * 0.5)
        await client.flush()
        await client.wait_ingested()
    return clients, sessions


async def resume(url: str, snapshot: str, question: str) -> tuple[str, str]:
    """(session id, answer) of a new connection that loads `snapshot` and asks."""
    async with StreamerClient(url) as client:
        session = (await client.start())["session"]
        await client.load(snapshot)
        return session, (await client.ask(question))["text"]


def test_a_killed_replica_closes_only_its_sessions_and_a_saved_memory_resumes_on_another(cluster):
    url, _ = cluster
    frames, question = video(200)

    async def scenario():
        clients, sessions = await one_per_replica(url, frames)
        before = [(await client.ask(question))["text"] for client in clients]
        await clients[0].save("killed.safetensors")
        killed = replica_of(sessions[0])
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{killed}", namespace="serve"), no_restart=True)
        await asyncio.wait_for(clients[0].reader, 60)  # its connection closes
        staying = (await clients[1].ask(question))["text"]  # the other replica's session goes on
        for _ in range(20):  # until the proxy stops sending new connections to the dead replica
            try:
                session, after = await resume(url, "killed.safetensors", question)
                break
            except (ServerError, OSError) as exc:
                print("reconnect:", exc)
                await asyncio.sleep(0.5)
        await clients[1].close()
        return before, staying, killed, session, after

    before, staying, killed, session, after = asyncio.run(scenario())
    assert staying == before[1]
    assert replica_of(session) != killed and after == before[0]
    routed_to(url, 2)  # Serve replaces the killed replica


def test_the_demo_runs_against_serve_unchanged(cluster, capsys):
    # 32 frames: the cluster runs under hostile_limits, 40 frames per session
    assert main(["demo", "--url", cluster[0], "--frames", "32", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert f"on {cluster[0]}" in out and " of 5 right" in out


def test_a_stopped_replica_tells_its_sessions_which_resume_elsewhere_from_a_snapshot(cluster):
    """Scale 2 -> 1: the replica being stopped sends `draining`; its client saves its memory, closes,
    reconnects (the proxy sends it to the running replica) and loads it there. (The last test: it
    leaves one replica.)"""
    url, limits = cluster
    frames, question = video(300)

    async def scenario():
        clients, sessions = await one_per_replica(url, frames)
        before = [(await client.ask(question))["text"] for client in clients]
        # the same deployment with one replica fewer (the same CPUs each: else Serve replaces both)
        scaled = application(replica_config(), limits, 1, DRAIN_S, cpus_per_replica=1.0)
        update = asyncio.create_task(asyncio.to_thread(serve.run, scaled, name=APP, route_prefix="/"))
        waits = [asyncio.create_task(client.next_event("draining")) for client in clients]
        done, others = await asyncio.wait(waits, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for task in others:
            task.cancel()
        told = waits.index(done.pop())
        notice = waits[told].result()
        await clients[told].save("drained.safetensors")
        await clients[told].close()
        session, after = await resume(url, "drained.safetensors", question)
        staying = (await clients[1 - told].ask(question))["text"]
        await clients[1 - told].close()
        await update
        return before, told, notice, sessions, session, after, staying

    before, told, notice, sessions, session, after, staying = asyncio.run(scenario())
    assert notice["seconds"] == DRAIN_S and "save" in notice["message"]
    assert replica_of(session) == replica_of(sessions[1 - told])
    assert after == before[told] and staying == before[1 - told]
    assert [r["state"] for r in replica_states()] == ["RUNNING"]
