"""`streamer make-video`: a small synthetic test video (frame index coded in the pixels), or one of the built-in
model's procedural videos with its questions (so that `streamer ask` on it means something)."""

from __future__ import annotations

from functools import partial

from streamer.builtin.sets import FPS as BUILTIN_FPS
from streamer.builtin.videos import FRAME, make_video
from video_io.synthetic import demo_frame, write_video


def add_parser(sub) -> None:
    p = sub.add_parser("make-video", help="write a small synthetic test video (frame index coded in the pixels)")
    p.add_argument("output", help="path of the .mp4 to write")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--fps", type=float, help="frames per second (default: 8; with --builtin 2, the rate it was "
                                             "trained at)")
    p.add_argument("--size", default="112x112", help="WIDTHxHEIGHT, even numbers (--builtin: 84x84)")
    p.add_argument("--builtin", type=int, metavar="SEED",
                   help="write the built-in model's kind of video (episodes of coloured shapes; --frames even, "
                        ">= 16) and print its questions and answers: ask them with `streamer ask VIDEO QUESTION "
                        "--fps 2`")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.builtin is not None:
        video = make_video(args.builtin, args.frames)
        fps = args.fps or BUILTIN_FPS
        frames = video.frames()
        write_video(args.output, args.frames, fps=fps, size=(FRAME, FRAME), content=lambda i: frames[i])
        print(f"wrote {args.output}: the built-in video of seed {args.builtin}, {args.frames} frames of "
              f"{FRAME}x{FRAME} at {fps:g} fps; its questions (read it with --fps {fps:g}):")
        for qa in video.questions():
            print(f"  {qa.question}  ->  {qa.answer}")
        return 0
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 112x112 (WIDTHxHEIGHT), got {args.size!r}") from None
    size = (width, height)
    fps = args.fps or 8.0
    write_video(args.output, args.frames, fps=fps, size=size, content=partial(demo_frame, size=size))
    print(f"wrote {args.output}: {args.frames} frames of {width}x{height} at {fps:g} fps")
    return 0
