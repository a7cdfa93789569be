"""The OpenAI Realtime endpoint (/v1/realtime, streamer/service/realtime.py) driven by the official `openai`
SDK's realtime client: its answers equal the native protocol's on the same frames, and
bad input gets OpenAI-style error events while the connection goes on."""

import asyncio
import base64

import pytest
from conftest import random_frames
from test_server import png, png_claiming, running_server

from streamer.builtin.videos import make_video
from streamer.service.client import StreamerClient
from streamer.service.protocol import ServerLimits

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

QUESTION = "What is in the video?"


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def image_item(frames) -> dict:
    return dict(type="message", role="user",
                content=[dict(type="input_image", image_url=data_url(png(frame))) for frame in frames])


def text_item(text: str) -> dict:
    return dict(type="message", role="user", content=[dict(type="input_text", text=text)])


def client_for(url: str, key: str = "unused") -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key=key, max_retries=0)


async def events_until(connection, kind: str, timeout: float = 60.0) -> list:
    """Server events up to and including the first of `kind`."""
    seen = []
    while True:
        event = await asyncio.wait_for(connection.recv(), timeout)
        seen.append(event)
        if event.type == kind:
            return seen


async def native_answer(url: str, frames, question: str, tokens: int) -> str:
    async with StreamerClient(url) as client:
        await client.start()
        await push_untimed(client, frames)
        await client.wait_ingested()  # asked sooner, a stream more than a chunk behind answers from its memory alone
        return (await client.ask(question, max_new_tokens=tokens))["text"]


async def until_ingested(connection, frames: int) -> list:
    """Server events (streamer.stats among them) until the session has ingested `frames` frames."""
    seen = []
    while True:
        await connection.send(dict(type="streamer.stats"))
        seen += await events_until(connection, "streamer.stats")
        if seen[-1].to_dict()["frames_ingested"] >= frames:
            return seen
        await asyncio.sleep(0.05)


async def push_untimed(client, frames):  # as input_image items come: no timestamps, 1 / fps apart
    for frame in frames:
        await client.send_frame(png(frame))


def test_the_sdk_streams_frames_and_gets_the_native_answer(tiny_runner):
    frames = make_video(1, 16).frames()  # a built-in video's frames, as input_image items

    async def scenario(url):
        native = await native_answer(url, frames, QUESTION, 5)
        async with client_for(url).realtime.connect(model="tiny-random") as connection:
            created = await connection.recv()
            await connection.session.update(session=dict(type="realtime", output_modalities=["text"],
                                                          max_output_tokens=5, video_memory=dict(chunk_frames=4)))
            updated = await events_until(connection, "session.updated")
            await connection.conversation.item.create(item=image_item(frames[:9]))
            await connection.conversation.item.create(item=image_item(frames[9:]))
            events = await until_ingested(connection, len(frames))
            await connection.conversation.item.create(item=text_item(QUESTION))
            await connection.response.create()
            events += await events_until(connection, "response.done")
        return native, created, updated, events

    with running_server(tiny_runner) as (_, url):
        native, created, updated, events = asyncio.run(scenario(url))
    assert created.type == "session.created" and created.session.model == "tiny-random"
    assert updated[-1].session.max_output_tokens == 5
    kinds = [event.type for event in events]
    assert kinds.count("conversation.item.added") == kinds.count("conversation.item.done") == 3
    assert kinds.index("response.created") < kinds.index("response.output_text.delta")
    memory = next(e for e in events if e.type == "session.updated").session.video_memory  # after the memory began
    assert memory["chunk_frames"] == 4 and memory["policy"] == "emloc"
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = events[-1].response
    assert text == native and next(e for e in events if e.type == "response.output_text.done").text == native
    assert done.status == "completed" and done.output[0].content[0].text == native
    assert 1 <= done.usage.output_tokens <= 5
    progress = [e.to_dict() for e in events if e.type == "streamer.progress"]  # a native message, passed on
    assert [p["frames"] for p in progress] == [4, 8, 12, 16]


def test_a_response_is_cancelled_and_the_session_goes_on(tiny_runner, monkeypatch):
    monkeypatch.setattr(tiny_runner, "stop_ids", set())  # the answer would run to its 400 tokens

    async def scenario(url):
        async with client_for(url).realtime.connect(model="tiny-random") as connection:
            await connection.conversation.item.create(item=image_item(random_frames(4)))
            await connection.conversation.item.create(item=text_item(QUESTION))
            await connection.response.create(response=dict(max_output_tokens=400))
            began = await events_until(connection, "response.output_text.delta")
            await connection.response.cancel()
            cancelled = began + await events_until(connection, "response.done")
            await connection.conversation.item.create(item=text_item("And now?"))
            await connection.response.create(response=dict(max_output_tokens=2))
            again = await events_until(connection, "response.done")
        return cancelled, again

    with running_server(tiny_runner) as (_, url):
        cancelled, again = asyncio.run(scenario(url))
    done = cancelled[-1].response
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    streamed = [e for e in cancelled if e.type == "response.output_text.delta"]
    assert 0 < len(streamed) < 100  # stopped long before its 400 tokens
    assert again[-1].response.status == "completed"


def test_bad_events_get_openai_errors_and_the_connection_goes_on(tiny_runner, clip):
    limits = ServerLimits(max_frame_pixels=10_000)

    async def scenario(url):
        errors = []
        async with client_for(url).realtime.connect(model="tiny-random") as connection:
            await connection.recv()  # session.created

            async def refused(event):
                await connection.send(event)
                error = (await events_until(connection, "error"))[-1].error
                errors.append((error.code, error.type, error.event_id))

            await refused(dict(type="conversation.item.create", event_id="e1", item=dict(
                type="message", role="user", content=[dict(type="input_image", image_url="data:text/plain;base64,aGk=")])))
            await refused(dict(type="conversation.item.create", event_id="e2", item=dict(
                type="message", role="user", content=[dict(type="input_image", image_url="https://example.com/x.jpg")])))
            await refused(dict(type="input_audio_buffer.append", event_id="e3", audio=""))
            await refused(dict(type="response.create", event_id="e4"))  # no question yet
            await refused(dict(type="session.update", event_id="e5", session=dict(video_memory=dict(budget=-1))))
            await refused(dict(type="streamer.ingest", event_id="e6", source="../outside.mp4"))
            await refused(dict(type="response.cancel", event_id="e7", response_id=["not", "an", "id"]))
            await connection.send(dict(type="conversation.item.create", item=dict(
                type="message", role="user", content=[dict(type="input_image",
                                                           image_url=data_url(png_claiming(4000, 4000)))])))
            pixel_limit = (await events_until(connection, "error"))[-1].error
            errors.append((pixel_limit.code, pixel_limit.type, None))
            await connection.conversation.item.create(item=image_item(random_frames(4)))
            await connection.conversation.item.create(item=text_item(QUESTION))
            await connection.response.create(response=dict(max_output_tokens=2))
            done = (await events_until(connection, "response.done"))[-1].response
        return errors, done

    with running_server(tiny_runner, limits) as (_, url):
        errors, done = asyncio.run(scenario(url))
    assert errors == [("bad_image", "invalid_request_error", "e1"), ("bad_image", "invalid_request_error", "e2"),
                      ("unknown_type", "invalid_request_error", "e3"), ("bad_question", "invalid_request_error", "e4"),
                      ("bad_option", "invalid_request_error", "e5"), ("forbidden_path", "invalid_request_error", None),
                      ("not_answering", "invalid_request_error", "e7"),
                      ("bad_image", "invalid_request_error", None)]
    assert done.status == "completed"


def test_the_token_is_the_sdk_api_key(tiny_runner):
    async def scenario(url):
        with pytest.raises(Exception) as refused:
            async with client_for(url, key="wrong").realtime.connect(model="m") as connection:
                await connection.recv()
        async with client_for(url, key="right").realtime.connect(model="m") as connection:
            created = await connection.recv()
        return refused.value, created

    with running_server(tiny_runner, ServerLimits(token="right")) as (_, url):
        refused, created = asyncio.run(scenario(url))
    assert "401" in str(refused) and created.type == "session.created"
