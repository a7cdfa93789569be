"""The benchmarks whose questions are asked at a moment of the video, by the name `streamer eval NAME` takes.

A benchmark is one module (ovobench.py, streamingbench.py): TITLE, the help for its QUESTIONS file and
VIDEOS folder, load_questions, score, summarize and format_table; timed.py asks its questions.
"""

from __future__ import annotations

from streamer.evaluation import ovobench, streamingbench

TIMED_BENCHMARKS = {"ovobench": ovobench, "streamingbench": streamingbench}
