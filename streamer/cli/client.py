"""`streamer client`: stream a video to a `streamer serve` server, ask during and after, print the answers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from streamer.cli.switches import ratio_list
from streamer.service.client import ServerError, StreamerClient, log_event, stream_frames
from video_io.sampling import Sampling
from video_io.sources import FileSource, StreamSource

log = logging.getLogger("streamer")


async def log_events(client: StreamerClient) -> None:
    while True:
        log_event(await client.events.get())


async def ask_and_print(client: StreamerClient, question: str, max_new_tokens: int | None = None) -> dict:
    print(f"Q: {question}\nA: ", end="", flush=True)
    answer = await client.ask(question, max_new_tokens, on_text=lambda text: print(text, end="", flush=True))
    stats = answer["stats"]
    rate = f", {stats['tokens_per_s']:.0f} tokens/s" if stats.get("tokens_per_s") else ""
    print(f"\n   [{stats['frames']} frames, memory {stats['memory_tokens']:.0f} of {stats['full_tokens']} tokens; "
          f"first token {stats['ttft_s'] * 1000:.0f} ms{rate}]", flush=True)
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
    options = {key: value for key, value in dict(
        policy=args.memory, delta=args.delta, ratios=args.ratios, group_size=args.group_size, ratio=args.ratio,
        budget=args.budget, chunk_frames=args.chunk_frames).items() if value is not None}
    async with StreamerClient(args.url, token=args.token) as client:
        ready = await client.start(**options)
        logger = asyncio.create_task(log_events(client))
        log.info("session %s on %s (%s, %d frames per chunk)", ready["session"], ready["model"], ready["policy"],
                 ready["chunk_frames"])
        if "://" in args.video:
            frames = StreamSource(args.video, fps=args.fps, max_frames=args.max_frames)
        else:
            sampling = Sampling(frames=args.frames, fps=None if args.frames else args.fps, max_frames=args.max_frames)
            frames = FileSource(args.video, sampling)
        halfway = len(frames) // 2 if hasattr(frames, "__len__") else None
        asked_during = []

        def on_frame(count: int) -> None:
            if count == halfway:
                asked_during.extend(asyncio.create_task(ask_when_ready(client, q, args.max_new_tokens))
                                    for q in args.ask_during)

        sent = await stream_frames(client, iter(frames), realtime=args.realtime, on_frame=on_frame,
                                   chunk_frames=ready["chunk_frames"])
        await client.flush()  # before waiting for the questions asked during: they may wait for a first chunk
        await asyncio.gather(*asked_during)
        stats = await client.wait_ingested()
        log.info("sent %d frames; memory %.0f of %d tokens", sent, stats["memory_tokens"], stats["full_tokens"])
        for question in args.ask:
            await ask_when_ready(client, question, args.max_new_tokens)
        if args.interactive:
            loop = asyncio.get_running_loop()
            while question := (await loop.run_in_executor(None, _prompt)).strip():
                await ask_when_ready(client, question, args.max_new_tokens)
        if args.json_stats:
            print(json.dumps(await client.stats(), indent=2))
        logger.cancel()
    return 0


def run(args) -> int:
    """run_client, with what can go wrong between a client and a server said in one line: 1 when the server
    refused or was not reached, 130 on Ctrl-C (bad switches exit 2 before this)."""
    def fail(message: str) -> int:
        print(f"streamer client: error: {message}", file=sys.stderr)
        return 1

    try:
        return asyncio.run(run_client(args))
    except KeyboardInterrupt:
        return 130
    except ServerError as exc:
        return fail(f"the server refused: {exc}")
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


def _prompt() -> str:
    try:
        return input("question> ")
    except EOFError:
        return ""


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
                   help="ask when half of the frames are sent (repeatable)")
    p.add_argument("--interactive", action="store_true", help="then read questions from the terminal")
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
