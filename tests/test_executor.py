"""The service's executor (streamer/service/executor.py): answers of different sessions share steps, a
question never waits for another answer or a whole chunk, a session that leaves leaves the batch; and
what it reports: GET /metrics and /health/ready (Ray Serve's: tests/test_ray_serve.py). Each answer still equals the
session's answer alone (tests/test_batching.py checks the engine under it)."""

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import random_frames, stream
from prometheus_client.parser import text_string_to_metric_families
from test_server import push, running_server, server_config, wait_until

import streamer.engine.runner as runner_module
import streamer.service.executor as executor_module
from streamer.engine.static_batch import StaticBatch
from streamer.service.client import ServerError, StreamerClient
from streamer.service.protocol import ServerLimits

LONG = 400  # tokens of the long answer (stop tokens switched off: it runs to the end)


def alone(runner, frames, question, tokens, config=None):
    policy = (config or server_config()).make_policy()
    return runner.answer(stream(runner, frames, 4, policy), question, tokens).text


async def noted(order: list, label: str, awaitable):
    """awaitable's result, with `label` appended to `order` when it is done."""
    result = await awaitable
    order.append(label)
    return result


async def ready_client(url, frames):
    client = StreamerClient(url)
    await client.__aenter__()
    await client.start()
    await push(client, frames)
    await client.wait_ingested()
    return client


@pytest.mark.parametrize("max_batch, order", [(32, ["short", "long"]), (1, ["long", "short"])])
def test_a_short_question_is_answered_while_another_session_generates(tiny_runner, monkeypatch, max_batch, order):
    """Batched, a 2-token question asked after a 400-token answer began finishes first; one answer at a time
    (max_batch 1, the engine before batching) it waits for the whole long answer."""
    monkeypatch.setattr(tiny_runner, "stop_ids", set())
    frames = random_frames(4)
    expected = alone(tiny_runner, frames, "Short?", 2)

    async def scenario(url):
        a, b = await ready_client(url, frames), await ready_client(url, frames)
        finished, begun = [], asyncio.Event()
        try:
            async def long():
                await a.ask("Long?", max_new_tokens=LONG, on_text=lambda _: begun.set())
                finished.append("long")

            async def short():
                await begun.wait()
                answer = await b.ask("Short?", max_new_tokens=2)
                finished.append("short")
                return answer

            _, answer = await asyncio.gather(long(), short())
        finally:
            await a.close()
            await b.close()
        return finished, answer

    with running_server(tiny_runner, ServerLimits(max_batch=max_batch)) as (_, url):
        finished, answer = asyncio.run(scenario(url))
    assert finished == order
    assert answer["text"] == expected


def test_a_question_is_answered_inside_a_long_chunk(tiny_runner, monkeypatch):
    """While a chunk's prefill holds the model thread (each of its layers slowed to 0.3 s), another
    session's question is set up and answered between its layers, and equals the answer alone."""
    frames = random_frames(4)
    config = server_config(policy="full")
    expected = alone(tiny_runner, frames, "What now?", 3, config)
    slow, ingesting = threading.Event(), threading.Event()
    original_run_layer, original_ingest = runner_module.run_layer, tiny_runner.ingest

    def run_layer(*args, **kwargs):
        if slow.is_set() and ingesting.is_set() and not server.shared.executor.inside:
            threading.Event().wait(0.3)
        return original_run_layer(*args, **kwargs)

    def ingest(*args, **kwargs):
        ingesting.set()
        try:
            return original_ingest(*args, **kwargs)
        finally:
            ingesting.clear()

    monkeypatch.setattr(runner_module, "run_layer", run_layer)
    monkeypatch.setattr(tiny_runner, "ingest", ingest)

    async def scenario(url):
        b = await ready_client(url, frames)
        async with StreamerClient(url) as a:
            await a.start()
            slow.set()
            await push(a, random_frames(4, seed=9))
            await asyncio.to_thread(ingesting.wait)
            order = []
            _, answer = await asyncio.gather(noted(order, "chunk", a.next_event("progress", timeout=60)),
                                             noted(order, "answer", b.ask("What now?", max_new_tokens=3)))
        await b.close()
        return order, answer

    with running_server(tiny_runner, ServerLimits(), config) as (server, url):
        order, answer = asyncio.run(scenario(url))
    assert order == ["answer", "chunk"]
    assert answer["text"] == expected


@pytest.mark.parametrize("seats", [False, True])
def test_a_session_that_leaves_mid_answer_leaves_the_batch(tiny_runner, monkeypatch, seats):
    """...and frees its seat of the static batch (a GPU's CUDA-graph steps; their eager path here)."""
    monkeypatch.setattr(tiny_runner, "stop_ids", set())
    if seats:
        monkeypatch.setattr(tiny_runner, "static_batch", StaticBatch(tiny_runner, cuda_graphs=False))
    frames = random_frames(4)
    expected = alone(tiny_runner, frames, "Short?", 5)

    async def scenario(url, server):
        a, b = await ready_client(url, frames), await ready_client(url, frames)
        begun = asyncio.Event()
        long = asyncio.create_task(a.ask("Long?", max_new_tokens=LONG, on_text=lambda _: begun.set()))
        await begun.wait()
        await a.close()  # gone mid-answer
        await asyncio.gather(long, return_exceptions=True)
        answer = await b.ask("Short?", max_new_tokens=5)
        await b.close()
        return answer

    with running_server(tiny_runner) as (server, url):
        answer = asyncio.run(scenario(url, server))
        wait_until(lambda: server.shared.executor.generating() == 0 and not server.sessions)
    assert answer["text"] == expected
    if seats:
        assert tiny_runner.static_batch.seats >= 1 and tiny_runner.static_batch.seated == [], "seated, then freed"


def test_an_idle_model_thread_frees_the_seat_buffers(tiny_runner, monkeypatch):
    """The seats grow to the largest burst of answers; once the model thread has been idle TRIM_AFTER_S, their
    device memory goes back (for the sessions' memories), and the next answer allocates again."""
    monkeypatch.setattr(executor_module, "TRIM_AFTER_S", 0.2)
    batch = StaticBatch(tiny_runner, cuda_graphs=False)
    monkeypatch.setattr(tiny_runner, "static_batch", batch)
    seated, admit = [], batch.admit
    monkeypatch.setattr(batch, "admit", lambda *args: seated.append(batch.seats) or admit(*args))
    frames = random_frames(4)
    expected = alone(tiny_runner, frames, "Short?", 3)

    async def scenario(url):
        client = await ready_client(url, frames)
        try:
            first = await client.ask("Short?", max_new_tokens=3)
            for _ in range(200):  # idle: freed
                if not batch.seats and not batch.keys:
                    break
                await asyncio.sleep(0.05)
            freed = not batch.seats and not batch.keys
            second = await client.ask("Short?", max_new_tokens=3)
        finally:
            await client.close()
        return first, second, freed

    with running_server(tiny_runner) as (_, url):
        first, second, freed = asyncio.run(scenario(url))
    assert freed and first["text"] == second["text"] == expected
    assert seated == [0, 0], "both answers were seated, the second into buffers allocated again"


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_readiness(tiny_runner):
    frames = random_frames(8)

    async def scenario(url):
        client = await ready_client(url, frames)
        answers = await asyncio.gather(*[client.ask(q, max_new_tokens=4) for q in ("One?", "Two?")])
        return client, answers

    with running_server(tiny_runner, ServerLimits()) as (server, url):
        http = url.replace("ws://", "http://")
        loop = asyncio.new_event_loop()
        client, answers = loop.run_until_complete(scenario(url))
        status, content_type, text = fetch(http + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        got = samples(text)
        session = (("session", next(iter(server.sessions))),)
        assert got[("streamer:time_to_first_token_seconds_count", ())] == 2
        assert got[("streamer:e2e_request_latency_seconds_count", ())] == 2
        assert got[("streamer:request_queue_time_seconds_count", ())] == 2
        assert got[("streamer:generation_tokens_total", ())] == sum(a["stats"]["tokens"] for a in answers)
        assert got[("streamer:inter_token_latency_seconds_count", ())] == sum(a["stats"]["tokens"] - 1
                                                                              for a in answers)
        assert got[("streamer:frames_ingested_total", ())] == 8
        assert got[("streamer:chunk_seconds_count", ())] == 2
        assert got[("streamer:batch_size_sum", ())] >= got[("streamer:batch_size_count", ())] > 0
        assert got[("streamer:sessions", ())] == 1
        assert got[("streamer:memory_tokens", session)] == answers[0]["stats"]["memory_tokens"]
        assert got[("streamer:memory_tokens_total", ())] == answers[0]["stats"]["memory_tokens"]
        assert got[("streamer:ingest_lag_frames", session)] == 0
        assert got[("streamer:num_requests_running", ())] == 0
        status, _, text = fetch(http + "/health/ready")
        assert status == 200 and json.loads(text)["status"] == "ready"
        server.draining = "the replica is being stopped"
        status, _, text = fetch(http + "/health/ready")
        assert status == 503 and json.loads(text)["status"] == "draining"
        loop.run_until_complete(client.close())
        loop.close()


def test_a_failed_step_fails_its_answers_and_the_server_goes_on(tiny_runner, monkeypatch):
    """A step that raises (out of memory, say) fails the answers in it with answer_failed; the next question is
    answered as usual."""
    import streamer.service.executor as executor_module

    frames = random_frames(4)
    expected = alone(tiny_runner, frames, "Again?", 3)
    original, calls = executor_module.advance, []

    def advance(runner, generations):
        calls.append(len(generations))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(runner, generations)

    monkeypatch.setattr(executor_module, "advance", advance)

    async def scenario(url):
        client = await ready_client(url, frames)
        try:
            with pytest.raises(ServerError, match="answer_failed.*out of memory"):
                await client.ask("First?", max_new_tokens=3)
            return await client.ask("Again?", max_new_tokens=3)
        finally:
            await client.close()

    with running_server(tiny_runner) as (server, url):
        answer = asyncio.run(scenario(url))
        assert server.shared.executor.generating() == 0
    assert answer["text"] == expected


def test_a_cancelled_answer_stops_with_its_text_so_far_and_the_session_goes_on(tiny_runner, monkeypatch):
    """`cancel` takes an answer out of the batch at the next step: its ask returns the text streamed so far
    (a prefix of the whole answer) marked cancelled, no token follows, and the session answers again."""
    monkeypatch.setattr(tiny_runner, "stop_ids", set())
    frames = random_frames(4)
    whole = alone(tiny_runner, frames, "Long?", LONG)

    async def scenario(url):
        client = await ready_client(url, frames)
        pieces = []
        try:
            def on_text(text):
                pieces.append(text)
                if len(pieces) == 3:
                    asyncio.get_running_loop().create_task(client.cancel("long"))

            answer = await client.ask("Long?", max_new_tokens=LONG, on_text=on_text, question_id="long")
            with pytest.raises(ServerError, match="not_answering"):  # it is over: nothing to cancel
                await client._request("cancel", id="long")
            again = await client.ask("Short?", max_new_tokens=2)
            late = [e for e in list(client.events._queue) if e.get("id") == "long"]
        finally:
            await client.close()
        return answer, pieces, again, late

    with running_server(tiny_runner) as (_, url):
        answer, pieces, again, late = asyncio.run(scenario(url))
    assert answer["cancelled"] is True and "stats" not in answer
    assert answer["text"] == "".join(pieces) and whole.startswith(answer["text"])
    assert 3 <= len(pieces) < LONG / 4, "the answer went on after the cancel"
    assert again["text"] == alone(tiny_runner, frames, "Short?", 2) and not late


def test_chunks_of_several_sessions_are_ingested_together(tiny_runner, monkeypatch):
    """With chunks of three sessions queued, the model thread ingests them together (their probe forwards packed:
    tests/test_together.py), and every session answers as it would alone; one chunk at a time (max_together 1)
    never does. The first chunk holds the model thread until the others' chunks are queued."""
    videos = [random_frames(8, seed=20 + i) for i in range(3)]
    expected = [alone(tiny_runner, frames, "What now?", 3) for frames in videos]
    original_ingest, together_sizes, first = tiny_runner.ingest, [], []
    original_together = executor_module.ingest_together

    def ingest_together(runner, calls):
        together_sizes.append(len(calls))
        return original_together(runner, calls)

    def ingest(*args, **kwargs):
        if not first:  # the server's first chunk: wait for two more
            first.append(True)
            wait_until(lambda: len(service.shared.executor.jobs) >= 2, timeout=60)
        return original_ingest(*args, **kwargs)

    monkeypatch.setattr(executor_module, "ingest_together", ingest_together)
    monkeypatch.setattr(tiny_runner, "ingest", ingest)

    async def scenario(url):
        clients = [StreamerClient(url) for _ in videos]
        try:
            for client in clients:
                await client.__aenter__()
                await client.start()
            await asyncio.gather(*[push(client, frames) for client, frames in zip(clients, videos)])
            await asyncio.gather(*[client.wait_ingested() for client in clients])
            return [(await client.ask("What now?", max_new_tokens=3))["text"] for client in clients]
        finally:
            await asyncio.gather(*[client.close() for client in clients])

    for max_together in (8, 1):
        together_sizes.clear()
        first.clear()
        with running_server(tiny_runner, ServerLimits(max_together=max_together)) as (service, url):
            answers = asyncio.run(scenario(url))
            metrics = service.metrics.text().decode()
        assert answers == expected
        if max_together == 1:
            assert together_sizes == []
        else:
            assert max(together_sizes) >= 2
            count = next(s.value for f in text_string_to_metric_families(metrics) if f.name == "streamer:ingest_together"
                         for s in f.samples if s.name.endswith("_count"))
            assert count == len(together_sizes)


def test_a_question_is_answered_while_chunks_ingest_together(tiny_runner, monkeypatch):
    """While two sessions' chunks are ingested together (each layer of their forwards slowed to 0.1 s, in their
    prefills and in their packed probe forwards), a third session's question is set up and answered between
    their layers, and equals the answer alone; the chunks then finish as they would."""
    frames = random_frames(4)
    expected = alone(tiny_runner, frames, "What now?", 3)
    grouped, release = threading.Event(), threading.Event()
    original_run_layer, original_together = runner_module.run_layer, executor_module.ingest_together

    def run_layer(*args, **kwargs):
        if grouped.is_set() and not service.shared.executor.inside:
            threading.Event().wait(0.1)
        return original_run_layer(*args, **kwargs)

    def ingest_together(runner, calls):
        grouped.set()
        try:
            return original_together(runner, calls)
        finally:
            grouped.clear()

    monkeypatch.setattr(runner_module, "run_layer", run_layer)
    monkeypatch.setattr(executor_module, "ingest_together", ingest_together)

    def hold():  # a job that keeps the model thread until both chunks are queued, so they go together
        release.wait(timeout=60)
        wait_until(lambda: len(service.shared.executor.jobs) >= 2, timeout=60)

    async def scenario(url):
        b = await ready_client(url, frames)
        a1, a2 = StreamerClient(url), StreamerClient(url)
        for client in (a1, a2):
            await client.__aenter__()
            await client.start()
        executor = service.shared.executor
        held = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(executor.submit(executor_module.INGEST, hold),
                                                                    executor.loop))
        await push(a1, random_frames(4, seed=7))
        await push(a2, random_frames(4, seed=8))
        release.set()
        await held
        await asyncio.to_thread(grouped.wait, 60)
        order = []
        *_, answer = await asyncio.gather(*[noted(order, "chunk", client.next_event("progress", timeout=120))
                                            for client in (a1, a2)],
                                          noted(order, "answer", b.ask("What now?", max_new_tokens=3)))
        for client in (a1, a2, b):
            await client.close()
        return order, answer

    with running_server(tiny_runner, ServerLimits()) as (service, url):
        order, answer = asyncio.run(scenario(url))
    assert order == ["answer", "chunk", "chunk"]
    assert answer["text"] == expected
