"""Long streams of generated videos, and questions about their first, middle and last part.

A stream is K videos of SEGMENT frames one after another (K = 4-16 for 4x-16x the 384 frames the
builtin was first trained on). Three of them are the parts asked about: the first video, the middle one
(K // 2) and the last, drawn to show different objects; each other video is the one of FILLER_DRAWS
that shows the fewest of the parts' objects. Every object of a part that appears nowhere else in the
stream (so a question naming it has one answer) is asked about: where it was, how many frames it stayed,
and what colour was shown with it when it had a companion; the first part also "What colour appeared
first?". `streamer eval long-stream` asks them of held-out streams, streamer/builtin/train_long.py trains
on others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.builtin.videos import COLOURS, DURATIONS, QA, Event, SyntheticVideo, ask_first, make_video, where_of

SEGMENT = 384  # frames per video of a stream: the longest the builtin was first trained on
PARTS = ("first", "middle", "last")
DRAWS = 5000  # candidate videos per stream: stream s draws seeds first_video + s * DRAWS ..
FILLER_DRAWS = 100  # candidates per video between the parts


@dataclass
class LongStream:
    seed: int
    videos: list[SyntheticVideo]
    parts: dict[str, int]  # part -> index of its video
    questions: dict[str, list[QA]]  # part -> its questions

    def frames(self, videos: int | None = None) -> list[np.ndarray]:
        return [frame for video in self.videos[:videos] for frame in video.frames()]


def part_questions(video: SyntheticVideo) -> list[tuple[Event, QA]]:
    """Every object of the video: where it was, how long it stayed, the colour shown with it."""
    questions = []
    for event in video.events:
        questions.append((event, where_of(event)))
        questions.append((event, QA("duration", f"How many frames did the {event.name} stay?", str(event.frames),
                                    len(DURATIONS))))
        companion = video.companion(event)
        if companion is not None:
            questions.append((event, QA("together", f"What colour was shown with the {event.name}?",
                                        companion.colour, len(COLOURS))))
    return questions


def names(video: SyntheticVideo) -> set[str]:
    return {event.name for event in video.events}


def make_stream(seed: int, count: int, first_video: int = 0) -> LongStream:
    """K = count videos of SEGMENT frames, and the questions about its parts' objects shown nowhere else (module
    docstring). Stream `seed` draws its videos from seeds first_video + seed * DRAWS on (evaluation: 0, below
    streamer.builtin.train.TRAIN_SEEDS; training: from TRAIN_SEEDS)."""
    parts = dict(first=0, middle=count // 2, last=count - 1)
    base = first_video + seed * DRAWS
    draws = iter(range(base, base + DRAWS))

    def draw(avoid: set[str], tries: int) -> SyntheticVideo:
        """Of the next `tries` videos, the first that shows none of `avoid`, else the one that shows fewest."""
        best = None
        for candidate, _ in zip(draws, range(tries)):
            video = make_video(candidate, SEGMENT)
            if best is None or len(names(video) & avoid) < len(names(best) & avoid):
                best = video
            if not names(best) & avoid:
                break
        if best is None:
            raise RuntimeError(f"stream {seed} used up its {DRAWS} video seeds")
        return best

    chosen, named = {}, set()
    for index in sorted(set(parts.values())):
        chosen[index] = draw(named, DRAWS)
        named |= names(chosen[index])
    videos = [chosen[i] if i in chosen else draw(named, FILLER_DRAWS) for i in range(count)]
    shown = [name for video in videos for name in names(video)]
    once = {name for name in shown if shown.count(name) == 1}
    questions = {part: [qa for event, qa in part_questions(videos[index]) if event.name in once]
                 for part, index in parts.items()}
    questions["first"].insert(0, ask_first(videos[0], np.random.default_rng(0)))
    return LongStream(seed, videos, parts, questions)
