"""`streamer` command line: ask about a video, answer from a saved memory, serve, stream to a server,
evaluate, measure, make a test video. This module only assembles the subcommands; each lives in
its own module of this package, and the switches they share in streamer/cli/switches.py.

A command's module is imported only when that command runs or shows its help (COMMANDS names it):
`streamer --help` and `streamer client` load no torch, where importing every command took seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

import importlib

from video_io.errors import VideoError

# command -> (its module in this package, what `streamer --help` says of it)
COMMANDS = {
    "ask": ("ask", "answer a question about a video file"),
    "answer": ("ask", "answer a question from a saved memory, without the video"),
    "serve": ("serve", "serve live video QA over websockets"),
    "client": ("client", "stream a video to a `streamer serve` server and ask questions"),
    "demo": ("demo", "stream a synthetic video through an in-process server and ask questions"),
    "bench": ("bench", "measure ingest, memory and answer speed per memory policy"),
    "bench-serve": ("bench_serve", "measure sessions accepted and answers per second of a service"),
    "eval": ("evaluate", "evaluate on a benchmark"),
    "calibrate": ("calibrate", "per-layer memory weights from a few of your videos, written into a config"),
    "make-video": ("video", "write a small synthetic test video (frame index coded in the pixels)"),
    "make-sets": ("sets", "write OVO-Bench and StreamingBench files on generated videos"),
}


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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of the command named in `argv` is imported (None: every command's)."""
    parser = argparse.ArgumentParser(prog="streamer", description="Streaming long-video question answering on "
                                     "Qwen2-VL with a pruned key/value memory.", formatter_class=HelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((arg for arg in argv if arg in COMMANDS), None) if argv is not None else None
    modules = {module for name, (module, _) in COMMANDS.items() if argv is None or name == named}
    for module in sorted(modules):
        importlib.import_module(f"streamer.cli.{module}").add_parser(sub)
    for name, (_, text) in COMMANDS.items():  # the others: named in the help, loaded when they run
        if name not in sub.choices:
            sub.add_parser(name, help=text)
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
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is noise here
    if args.quiet and "transformers" in sys.modules:  # a command that loads a model: "Loading weights" is progress
        importlib.import_module("transformers.utils.logging").disable_progress_bar()
    try:
        return args.run(args)
    except (VideoError, ValueError, FileNotFoundError) as exc:
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
