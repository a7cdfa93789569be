"""POST /v1/chat/completions and GET /v1/models (streamer/service/chat.py) driven by the official `openai` SDK:
a video under the allowed root or a list of frames is answered from a fresh memory, plain and streamed, with
the answer the native protocol gives on the same video; bad requests get OpenAI's error objects with our codes
and the server goes on."""

import asyncio
import base64

import pytest
from conftest import random_frames
from test_server import png, running_server, wait_until

from streamer.service.client import StreamerClient
from streamer.service.protocol import ServerLimits

openai = pytest.importorskip("openai")

QUESTION = "What happens in the video?"


def sdk(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key=key, max_retries=0)


def user(*parts) -> list[dict]:
    return [dict(role="system", content="You are helpful."), dict(role="user", content=[*parts,
                                                                                          dict(type="text", text=QUESTION)])]


def video_part(path: str) -> dict:
    return dict(type="video_url", video_url=dict(url=path))


def image_part(data: bytes, kind: str = "image/png") -> dict:
    return dict(type="image_url", image_url=dict(url=f"data:{kind};base64,{base64.b64encode(data).decode()}"))


async def native(url: str, tokens: int, source: str | None = None, frames=()) -> str:
    async with StreamerClient(url) as client:
        await client.start()
        if source is not None:
            await client.ingest(source)
            await client.next_event("ingest_done", timeout=60)
        for frame in frames:
            await client.send_frame(png(frame))
        return (await client.ask(QUESTION, max_new_tokens=tokens))["text"]


def test_a_video_under_the_root_is_answered_plain_and_streamed(tiny_runner, clip):
    with running_server(tiny_runner, ServerLimits(allowed_roots=[clip])) as (service, url):
        expected = asyncio.run(native(url, 5, source="clip.mp4"))
        client = sdk(url)
        plain = client.chat.completions.create(model="tiny-random", messages=user(video_part("clip.mp4")),
                                               max_tokens=5)
        chunks = list(client.chat.completions.create(model="tiny-random", messages=user(video_part("clip.mp4")),
                                                     max_tokens=5, stream=True,
                                                     stream_options=dict(include_usage=True)))
        listed = client.models.list()
        assert not service.sessions  # each request's session closed with it
    assert plain.choices[0].message.content == expected and plain.object == "chat.completion"
    assert plain.choices[0].finish_reason in ("stop", "length") and 1 <= plain.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and not chunks[-1].choices
    assert [model.id for model in listed.data] == ["tiny-random"]


def test_frames_as_image_urls_are_answered_as_the_native_protocol_answers_them(tiny_runner):
    frames = random_frames(6)
    with running_server(tiny_runner) as (_, url):
        expected = asyncio.run(native(url, 4, frames=frames))
        reply = sdk(url).chat.completions.create(model="m", max_completion_tokens=4,
                                                 messages=user(*[image_part(png(f)) for f in frames]))
    assert reply.choices[0].message.content == expected


def test_bad_requests_get_openai_errors_and_the_server_goes_on(tiny_runner, clip):
    (clip.parent / "outside.mp4").write_bytes((clip / "clip.mp4").read_bytes())
    with running_server(tiny_runner, ServerLimits(allowed_roots=[clip], token="key")) as (service, url):
        client = sdk(url, key="key")
        refusals = []
        for error, messages in [
                (openai.PermissionDeniedError, user(video_part("../outside.mp4"))),
                (openai.NotFoundError, user(video_part("missing.mp4"))),
                (openai.BadRequestError, user(image_part(b"hello", "text/plain"))),
                (openai.BadRequestError, user(video_part("clip.mp4"), image_part(png(random_frames(1)[0])))),
                (openai.BadRequestError, [dict(role="user", content=[video_part("clip.mp4")])])]:
            with pytest.raises(error) as refused:
                client.chat.completions.create(model="m", messages=messages, max_tokens=2)
            refusals.append(refused.value.code)
        with pytest.raises(openai.AuthenticationError):
            sdk(url, key="wrong").chat.completions.create(model="m", messages=user(video_part("clip.mp4")))
        with pytest.raises(openai.APIError) as mid_stream:  # refused after the stream began: an error event
            list(client.chat.completions.create(model="m", messages=user(video_part("corrupt.mp4")), stream=True))
        after = client.chat.completions.create(model="m", messages=user(video_part("clip.mp4")), max_tokens=2)
        wait_until(lambda: not service.sessions)  # the refused stream's session closes as its error is sent
    assert refusals == ["forbidden_path", "not_found", "bad_image", "bad_message", "bad_question"]
    assert "bad_video" in str(mid_stream.value) or getattr(mid_stream.value, "code", None) == "bad_video"
    assert after.choices[0].message.content


def test_a_question_to_a_live_session_is_answered_from_its_memory(tiny_runner):
    """With X-Streamer-Session (the key in a session's `ready`), a chat request asks that session's memory: the
    answer equals the session's own; a wrong key is not found, and a video beside the key is refused."""
    frames = random_frames(8)

    async def scenario(url):
        async with StreamerClient(url) as owner:
            ready = await owner.start()
            for frame in frames:
                await owner.send_frame(png(frame))
            await owner.wait_ingested()
            own = (await owner.ask(QUESTION, max_new_tokens=4))["text"]
            client = openai.AsyncOpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key="k", max_retries=0)
            asked = [dict(role="user", content=QUESTION)]
            plain = await client.chat.completions.create(model="m", messages=asked, max_tokens=4,
                                                         extra_headers={"X-Streamer-Session": ready["key"]})
            stream = await client.chat.completions.create(model="m", messages=asked, max_tokens=4, stream=True,
                                                          extra_headers={"X-Streamer-Session": ready["key"]})
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="m", messages=asked,
                                                     extra_headers={"X-Streamer-Session": "not-a-key"})
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="m", messages=user(video_part("clip.mp4")),
                                                     extra_headers={"X-Streamer-Session": ready["key"]})
            after = await owner.stats()
        return ready, own, plain.choices[0].message.content, streamed, after

    with running_server(tiny_runner) as (_, url):
        ready, own, plain, streamed, after = asyncio.run(scenario(url))
    assert len(ready["key"]) >= 20 and ready["key"] != ready["session"]
    assert plain == streamed == own
    assert after["questions_answered"] == 3  # the owner's and the two chat questions


def test_a_live_question_ends_with_an_error_when_its_session_closes(tiny_runner, monkeypatch):
    monkeypatch.setattr(tiny_runner, "stop_ids", set())  # a 400-token answer: the owner leaves mid-answer

    async def scenario(url):
        owner = StreamerClient(url)
        await owner.__aenter__()
        ready = await owner.start()
        for frame in random_frames(4):
            await owner.send_frame(png(frame))
        await owner.wait_ingested()
        client = openai.AsyncOpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=[dict(role="user", content=QUESTION)],
                                                      max_tokens=400, stream=True,
                                                      extra_headers={"X-Streamer-Session": ready["key"]})
        pieces = 0
        with pytest.raises(openai.APIError, match="session closed"):
            async for chunk in stream:
                pieces += 1
                if pieces == 3:
                    await owner.close()
        return pieces

    with running_server(tiny_runner) as (service, url):
        pieces = asyncio.run(scenario(url))
        wait_until(lambda: not service.sessions)
    assert 3 <= pieces < 100
