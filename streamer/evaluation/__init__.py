"""Benchmark evaluation: `streamer eval videomme` (Video-MME, lmms-eval's prompt and scoring)."""

from streamer.evaluation.cli import add_parser

__all__ = ["add_parser"]
