"""Procedural videos with questions and answers, for training and evaluating the built-in model.

A video is a plain dark background (with a little pixel noise) on which coloured shapes appear
one at a time: each event shows one object (a colour and a shape, unique within the video) for
EVENT_FRAMES frames, starting on an even frame so it fills whole frame pairs (Qwen2-VL's
temporal patches), with at least one empty frame pair between events. Frames are FRAME x FRAME
pixels: at the BUILTIN_PRESET that is 2 x 2 LLM tokens per frame pair, so 384 frames are 768
video tokens and an event is 8 of them, which is what makes a small memory possible.

Everything is deterministic by seed: make_video(seed, frames) gives the same events, pixels and
questions on every machine. Answers are single words of the tiny tokenizer (colour, shape,
digit, option letter), except `describe`, which lists the events and exists so that the
memory's generic probe ("Describe what happens in the video.") is a question the model knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory.probe import GENERIC_PROMPTS
from video_io.preprocess import VisionPreset

FRAME = 56
BUILTIN_PRESET = VisionPreset(min_pixels=FRAME * FRAME, max_pixels=FRAME * FRAME)  # 4 x 4 patches, 4 tokens per pair
EVENT_FRAMES = 4  # two frame pairs
MIN_GAP_PAIRS = 1  # empty frame pairs between events, so occurrences can be counted
MIN_EVENTS, MAX_EVENTS = 3, 6
MAX_REPEATS = 3  # most events of one colour in a video: counts are 0..3

COLOURS = {
    "red": (225, 35, 35), "green": (35, 190, 60), "blue": (45, 85, 235),
    "yellow": (235, 220, 40), "purple": (150, 55, 205), "orange": (250, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
LETTERS = "ABCD"
COUNT_ANSWERS = tuple(str(n) for n in range(MAX_REPEATS + 1))

# Question families scored by the evaluation, and `describe`, trained but not scored.
FAMILIES = ("first", "last", "after", "count", "order")
DESCRIBE = "describe"
TRAIN_FAMILIES = (*FAMILIES, DESCRIBE)


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    start: int  # first frame showing the object
    frames: int = EVENT_FRAMES

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class QA:
    family: str
    question: str
    answer: str
    choices: int  # answers that were possible: chance is 1 / choices


def min_frames(events: int) -> int:
    """Shortest video that fits `events` events with their gaps."""
    return (events * (EVENT_FRAMES // 2 + MIN_GAP_PAIRS) - MIN_GAP_PAIRS) * 2


def _event_slots(rng: np.random.Generator, pairs: int, count: int) -> list[int]:
    """Start pairs of `count` events of EVENT_FRAMES/2 pairs, spread at random with the minimum gaps."""
    span = EVENT_FRAMES // 2 + MIN_GAP_PAIRS
    free = pairs - (count * span - MIN_GAP_PAIRS)
    picks = np.sort(rng.choice(free + count, size=count, replace=False))
    return [int(p) + i * (span - 1) for i, p in enumerate(picks)]


def _event_objects(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs; a small palette per video makes colours repeat (for counting)."""
    palette = list(rng.choice(list(COLOURS), size=int(rng.integers(2, len(COLOURS) + 1)), replace=False))
    objects: list[tuple[str, str]] = []
    while len(objects) < count:
        colour, shape = str(rng.choice(palette)), str(rng.choice(SHAPES))
        if (colour, shape) not in objects and sum(c == colour for c, _ in objects) < MAX_REPEATS:
            objects.append((colour, shape))
    return objects


@dataclass(frozen=True)
class SyntheticVideo:
    seed: int
    num_frames: int
    background: int  # grey level
    events: tuple[Event, ...]
    layout: tuple[tuple[int, int, int], ...]  # per event: centre x, centre y, radius in pixels

    def frames(self) -> list[np.ndarray]:
        """The video as (FRAME, FRAME, 3) uint8 RGB frames."""
        rng = np.random.default_rng([self.seed, self.num_frames, 2])
        noise = rng.integers(-6, 7, size=(self.num_frames, FRAME, FRAME, 3), dtype=np.int16)
        video = (noise + self.background).clip(0, 255).astype(np.uint8)
        for event, (x, y, radius) in zip(self.events, self.layout):
            mask = shape_mask(event.shape, x, y, radius)
            video[event.start:event.start + event.frames, mask] = COLOURS[event.colour]
        return list(video)

    def event_tokens(self) -> np.ndarray:
        """Bool [frame pairs, rows, columns] over the LLM's video tokens (one per merged 28 x 28 cell of a
        frame pair at BUILTIN_PRESET): True where an object is shown -- what an oracle memory keeps."""
        cell = BUILTIN_PRESET.patch_size * BUILTIN_PRESET.merge_size
        shows = np.zeros((self.num_frames // 2, FRAME // cell, FRAME // cell), dtype=bool)
        for event, (x, y, radius) in zip(self.events, self.layout):
            cells = shape_mask(event.shape, x, y, radius).reshape(FRAME // cell, cell, FRAME // cell, cell)
            shows[event.start // 2:(event.start + event.frames + 1) // 2] |= cells.any(axis=(1, 3))
        return shows

    def questions(self, families: tuple[str, ...] = FAMILIES) -> list[QA]:
        """One question per family, in the order given; deterministic by the video's seed."""
        rng = np.random.default_rng([self.seed, self.num_frames, 1])
        return [ASK[family](self, rng) for family in families]


def make_video(seed: int, num_frames: int) -> SyntheticVideo:
    """A video of `num_frames` frames (even, >= min_frames(MIN_EVENTS)) with 3-6 events."""
    if num_frames % 2 or num_frames < min_frames(MIN_EVENTS):
        raise ValueError(f"num_frames must be even and >= {min_frames(MIN_EVENTS)}, got {num_frames}")
    rng = np.random.default_rng([seed, num_frames])
    most = max(n for n in range(MIN_EVENTS, MAX_EVENTS + 1) if min_frames(n) <= num_frames)
    count = int(rng.integers(MIN_EVENTS, most + 1))
    starts = _event_slots(rng, num_frames // 2, count)
    events = tuple(Event(c, s, 2 * p) for (c, s), p in zip(_event_objects(rng, count), starts))
    layout = tuple((FRAME // 2 + int(rng.integers(-4, 5)), FRAME // 2 + int(rng.integers(-4, 5)),
                    int(rng.integers(18, 24))) for _ in events)
    return SyntheticVideo(seed, num_frames, int(rng.integers(15, 70)), events, layout)


def shape_mask(shape: str, x: int, y: int, radius: int) -> np.ndarray:
    """Bool (FRAME, FRAME) mask of a shape centred at (x, y) that fits in a circle of `radius`."""
    ys, xs = np.mgrid[0:FRAME, 0:FRAME].astype(np.float32)
    dx, dy = xs - x, ys - y
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = radius * 0.75
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up: inside the three edges
        top, base = -radius, radius * 0.6
        slope = (base - top) / (radius * 0.95)
        return (dy <= base) & (dy >= top + slope * np.abs(dx))
    if shape == "star":  # five points: the radius alternates between outer and inner along the angle
        angle = (np.arctan2(dx, -dy) % (2 * np.pi / 5)) / (2 * np.pi / 5)  # 0..1 within one point
        edge = radius * (0.4 + 0.6 * np.abs(1 - 2 * angle))
        return np.hypot(dx, dy) <= edge
    raise ValueError(f"unknown shape {shape!r}")


# --- question families: each takes (video, rng) and returns a QA ---------------------------------

def ask_first(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return QA("first", "What colour appeared first?", video.events[0].colour, len(COLOURS))


def ask_last(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return QA("last", "What shape appeared last?", video.events[-1].shape, len(SHAPES))


def ask_after(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    i = int(rng.integers(len(video.events) - 1))
    return QA("after", f"What colour appeared after the {video.events[i].name}?", video.events[i + 1].colour,
              len(COLOURS))


def ask_count(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    """The count is drawn first (among those some colour has), so answers are spread over 0..3."""
    counts = {colour: sum(e.colour == colour for e in video.events) for colour in COLOURS}
    target = int(rng.choice(sorted(set(counts.values()))))
    colour = str(rng.choice([c for c, n in counts.items() if n == target]))
    return QA("count", f"How many times did a {colour} shape appear?", str(target), len(COUNT_ANSWERS))


def ask_order(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    """Up to four of the video's events as options in random order; the answer is the earliest."""
    count = min(len(LETTERS), len(video.events))
    picked = rng.choice(len(video.events), size=count, replace=False)
    options = " ".join(f"{LETTERS[k]}. {video.events[i].name}" for k, i in enumerate(picked))
    return QA("order", f"Which appeared first? {options}", LETTERS[int(np.argmin(picked))], count)


def ask_describe(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return QA(DESCRIBE, GENERIC_PROMPTS[0], ", ".join(e.name for e in video.events), 0)


ASK = {"first": ask_first, "last": ask_last, "after": ask_after, "count": ask_count, "order": ask_order,
       DESCRIBE: ask_describe}
