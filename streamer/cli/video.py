"""`streamer make-video`: a small synthetic test video (frame index coded in the pixels)."""

from __future__ import annotations

from functools import partial

from video_io.synthetic import demo_frame, write_video


def add_parser(sub) -> None:
    p = sub.add_parser("make-video", help="write a small synthetic test video (frame index coded in the pixels)")
    p.add_argument("output", help="path of the .mp4 to write")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", default="112x112", help="WIDTHxHEIGHT, even numbers")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 112x112 (WIDTHxHEIGHT), got {args.size!r}") from None
    size = (width, height)
    write_video(args.output, args.frames, fps=args.fps, size=size, content=partial(demo_frame, size=size))
    print(f"wrote {args.output}: {args.frames} frames of {width}x{height} at {args.fps:g} fps")
    return 0
