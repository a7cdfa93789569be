"""`streamer` command line: ask about a video, answer from a saved memory, serve, stream to a server,
evaluate, measure, make a test video. This module only assembles the subcommands; each lives in
its own module of this package, and the switches they share in streamer/cli/switches.py."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

from transformers.utils import logging as transformers_logging

from streamer.cli import ask, bench, bench_serve, client, demo, evaluate, serve, sets, video
from video_io.errors import VideoError


def package_version() -> str:
    """The installed package's version (pyproject.toml), or 'unknown' when run from a tree not installed."""
    try:
        return importlib.metadata.version("video-streamer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, where it has one and the help does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS, [])
                and "default" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Streaming long-video question answering on "
                                     "Qwen2-VL with a pruned key/value memory.", formatter_class=HelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (ask, serve, client, demo, bench, bench_serve, evaluate, video, sets):
        command.add_parser(sub)
    for command in sub.choices.values():  # `streamer ask -q ...` as well as `streamer -q ask ...`
        command.formatter_class = HelpFormatter
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress messages")
        for group in command._subparsers._group_actions if command._subparsers else []:  # eval videomme ...
            for nested in group.choices.values():
                nested.formatter_class = HelpFormatter
                nested.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                    help="no progress messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is noise here
    if args.quiet:
        transformers_logging.disable_progress_bar()  # "Loading weights" is progress too
    try:
        return args.run(args)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
