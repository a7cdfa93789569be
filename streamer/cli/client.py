"""`streamer client`: stream a video to a `streamer serve` server, ask during and after, print the answers."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import threading

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from streamer.cli.values import ratio_list
from streamer.service.client import ServerError, StreamerClient, log_event, stream_frames
from video_io.errors import VideoError
from video_io.sampling import Sampling
from video_io.sources import FileSource, StreamSource

log = logging.getLogger("streamer")


_screens: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}


def screen() -> asyncio.Lock:
    """The terminal is shared by streamed answers and progress lines: one holder at a time, so an answer is
    never cut by a progress line or by another answer (one lock per event loop: each run has its own)."""
    loop = asyncio.get_running_loop()
    for old in [other for other in _screens if other.is_closed()]:
        del _screens[old]
    return _screens.setdefault(loop, asyncio.Lock())


async def log_events(client: StreamerClient) -> None:
    while True:
        event = await client.events.get()
        async with screen():
            log_event(event)


async def ask_and_print(client: StreamerClient, question: str, max_new_tokens: int | None = None) -> dict:
    async with screen():
        print(f"Q: {question}\nA: ", end="", flush=True)
        answer = await client.ask(question, max_new_tokens, on_text=lambda text: print(text, end="", flush=True))
        stats = answer["stats"]
        rate = f", {stats['tokens_per_s']:.0f} tokens/s" if stats.get("tokens_per_s") else ""
        empty = "(an empty answer: the model ended it at once)" if not answer["text"].strip() else ""
        print(f"{empty}\n   [{stats['frames']} frames, memory {stats['memory_tokens']:.0f} of {stats['full_tokens']} "
              f"tokens; first token {stats['ttft_s'] * 1000:.0f} ms{rate}]", flush=True)
    return answer


async def ask_when_ready(client: StreamerClient, question: str, max_new_tokens: int | None) -> dict | None:
    """Ask once the server holds some video (a question before any chunk is ingested has nothing to
    answer from); a refusal is printed, not raised, so the other questions still get asked."""
    while (await client.stats())["chunks"] == 0:
        await asyncio.sleep(0.1)
    try:
        return await ask_and_print(client, question, max_new_tokens)
    except ServerError as exc:
        print(f"\n   [refused: {exc}]", flush=True)
        return None


async def run_client(args) -> int:
    """0 when the whole video was sent and every question answered; 1 when the source broke off (the
    questions are still asked, from what was sent) or a question was refused."""
    options = {key: value for key, value in dict(
        policy=args.memory, delta=args.delta, ratios=args.ratios, group_size=args.group_size, ratio=args.ratio,
        budget=args.budget, chunk_frames=args.chunk_frames).items() if value is not None}
    async with StreamerClient(args.url, token=args.token) as client:
        ready = await client.start(**options)
        logger = asyncio.create_task(log_events(client))
        log.info("session %s on %s (%s, %d frames per chunk)", ready["session"], ready["model"], ready["policy"],
                 ready["chunk_frames"])
        frames = open_source(args)
        halfway = len(frames) // 2 if isinstance(frames, FileSource) and args.ask_every is None else None
        asked_during, next_ask = [], args.ask_every

        def on_frame(count: int, frame) -> None:
            nonlocal next_ask
            due = count == halfway
            if next_ask is not None and frame.ts >= next_ask:
                due, next_ask = True, next_ask + args.ask_every * (1 + (frame.ts - next_ask) // args.ask_every)
            if due:
                asked_during.extend(asyncio.create_task(ask_when_ready(client, q, args.max_new_tokens))
                                    for q in args.ask_during)

        broke_off = None
        try:
            sent = await stream_frames(client, broken_off_at_end(frames), realtime=args.realtime,
                                       on_frame=on_frame, chunk_frames=ready["chunk_frames"])
        except SourceBrokeOff as exc:  # a live source that stalled or died: what was sent still answers
            broke_off, sent = exc.error, exc.sent
            print(f"streamer client: error: {broke_off}; asking the questions about the {sent} frames sent",
                  file=sys.stderr, flush=True)
        await client.flush()  # before waiting for the questions asked during: they may wait for a first chunk
        answers = list(await asyncio.gather(*asked_during))
        stats = await client.wait_ingested()
        log.info("sent %d frames; memory %.0f of %d tokens", sent, stats["memory_tokens"], stats["full_tokens"])
        for question in args.ask:
            answers.append(await ask_when_ready(client, question, args.max_new_tokens))
        if args.interactive:
            while question := await read_question(client):
                await ask_when_ready(client, question, args.max_new_tokens)
        if args.json_stats:
            print(json.dumps(await client.stats(), indent=2))
        logger.cancel()
    return 1 if broke_off is not None or None in answers else 0


class SourceBrokeOff(Exception):
    def __init__(self, error: VideoError, sent: int):
        self.error, self.sent = error, sent


def broken_off_at_end(frames):
    """The frames of a source; a source that breaks off mid-way ends the iteration with SourceBrokeOff."""
    count = 0
    try:
        for frame in frames:
            yield frame
            count += 1
    except VideoError as exc:
        raise SourceBrokeOff(exc, count) from exc


def open_source(args):
    """The frames to send: a stream URL (live, with timeouts and reconnects) or a local file, sampled."""
    if "://" in args.video:
        return StreamSource(args.video, fps=args.fps, max_frames=args.max_frames, realtime=args.realtime,
                            read_timeout=args.read_timeout, reconnect=args.reconnect)
    sampling = Sampling(frames=args.frames, fps=None if args.frames else args.fps, max_frames=args.max_frames)
    return FileSource(args.video, sampling)


def run(args) -> int:
    """run_client, with what can go wrong between a client and a server said in one line: 1 when the server
    refused or was not reached, 130 on Ctrl-C (bad switches exit 2 before this)."""
    def fail(message: str, code: int = 1) -> int:
        print(f"streamer client: error: {message}", file=sys.stderr)
        return code

    if args.ask_during and "://" in args.video and args.ask_every is None:
        return fail("--ask-during asks halfway through a video, and a stream URL has no length: give --ask-every "
                    "SECONDS to ask them every SECONDS of the stream", 2)
    for switch, value in (("--ask-every", args.ask_every), ("--read-timeout", args.read_timeout)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            return fail(f"{switch} must be a number of seconds > 0, got {value}", 2)
    if args.reconnect < 0:
        return fail(f"--reconnect must be >= 0, got {args.reconnect}", 2)
    try:
        return asyncio.run(run_client(args))
    except KeyboardInterrupt:
        return 130
    except ServerError as exc:
        closed = exc.code in ("connection_closed", "idle_timeout", "draining")
        return fail(f"the server {'closed the session' if closed else 'refused'}: {exc}")
    except InvalidURI:
        return fail(f"--url {args.url} is not a websocket address; give ws://HOST:PORT (or wss://)")
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            return fail(f"{args.url} wants a token and {'refused this one' if args.token else 'none was given'}; "
                        "give --token or set $STREAMER_TOKEN")
        return fail(f"{args.url} answered HTTP {status}, not a websocket: is it a streamer server?")
    except InvalidHandshake as exc:
        return fail(f"{args.url} is not a streamer server ({exc})")
    except ConnectionClosed as exc:
        return fail(f"the server closed the connection ({exc.rcvd.reason if exc.rcvd else 'no reason given'})")
    except (OSError, TimeoutError) as exc:
        return fail(f"cannot connect to {args.url}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")


async def read_question(client: StreamerClient) -> str:
    """The next question typed ('' at the end of input); ServerError if the server closes the session first (an
    idle timeout, a shutdown) rather than when the next question is sent. stdin is read on a daemon thread:
    Ctrl-C ends the client at once, where a worker of the loop's executor kept it waiting for a line."""
    loop = asyncio.get_running_loop()
    line = loop.create_future()

    def read() -> None:
        text = _prompt()
        try:
            loop.call_soon_threadsafe(lambda: line.done() or line.set_result(text))
        except RuntimeError:  # the client ended meanwhile: nobody waits for this line
            pass

    threading.Thread(target=read, name="prompt", daemon=True).start()
    await asyncio.wait({line, client.reader}, return_when=asyncio.FIRST_COMPLETED)
    if not line.done():
        line.cancel()
        raise ServerError(client.last_error or dict(code="connection_closed", message="the connection closed"))
    return line.result().strip()


_typed = bytearray()  # what was read from stdin past the last line given


def _prompt() -> str:
    """A line from stdin ('' at its end), after the prompt. Read with os.read, not input(): a thread blocked in
    input() holds stdin's buffer lock, and Python aborts at exit when a daemon thread does (Ctrl-C at the prompt)."""
    print("question> ", end="", flush=True)
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdin
        return ""
    while b"\n" not in _typed:
        data = os.read(fd, 4096)
        if not data:
            break
        _typed.extend(data)
    end = _typed.find(b"\n") + 1 or len(_typed)
    text = bytes(_typed[:end]).decode(errors="replace")
    del _typed[:end]
    return text


def add_parser(sub) -> None:
    p = sub.add_parser("client", help="stream a video to a `streamer serve` server and ask questions",
                       description="Stream a local video file (or a URL/device PyAV can open) to a server, ask "
                                   "questions during and after, print the streamed answers.")
    p.add_argument("video", help="a local video file, or a stream URL")
    p.add_argument("--url", default="ws://127.0.0.1:8765", help="the server's websocket URL")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"),
                   help="bearer token, if the server wants one (default: $STREAMER_TOKEN)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, default=1.0, help="frames per second of video to send (default 1)")
    sampling.add_argument("--frames", type=int, help="send N frames spread uniformly instead")
    p.add_argument("--max-frames", type=int, help="at most this many frames")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="send frames at the video's own pace (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="send frames as fast as the server ingests them (none dropped)")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="ask after streaming (repeatable)")
    p.add_argument("--ask-during", action="append", default=[], metavar="QUESTION",
                   help="ask when half of the frames are sent (repeatable); with --ask-every, every so often")
    p.add_argument("--ask-every", type=float, metavar="SECONDS",
                   help="ask the --ask-during questions each time SECONDS more of the video were sent (a stream "
                        "URL has no halfway: it needs this)")
    p.add_argument("--interactive", action="store_true", help="then read questions from the terminal")
    live = p.add_argument_group("stream URLs")
    live.add_argument("--read-timeout", type=float, default=10.0,
                      help="seconds without data after which a stream URL has stalled (default 10)")
    live.add_argument("--reconnect", type=int, default=0, metavar="N",
                      help="open a stream URL again up to N times after it stalls or drops (default 0)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--memory", help="memory policy for this session")
    p.add_argument("--delta", type=float)
    p.add_argument("--ratios", type=ratio_list)
    p.add_argument("--group-size", type=int)
    p.add_argument("--ratio", type=float)
    p.add_argument("--budget", type=int)
    p.add_argument("--chunk-frames", type=int)
    p.add_argument("--json-stats", action="store_true", help="print the session's stats as JSON at the end")
    p.set_defaults(run=run)
