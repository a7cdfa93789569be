"""Procedural videos with questions and answers, for training and evaluating the built-in model.

A frame is FRAME x FRAME pixels, 3 x 3 cells of 28 x 28: at the BUILTIN_PRESET each cell of a
frame pair is one LLM video token (9 per pair; 384 frames are 1728 tokens). The background is
dark with a little pixel noise, and its shade differs by cell (red grows to the right, blue
downwards), as a real scene's does: where an object stands can be seen from its own token.

An event shows one object (a colour and a shape, unique within the video) inside one cell, for
2, 4, 8 or 16 frames, starting on an even frame so it fills whole frame pairs (Qwen2-VL's
temporal patches). Events come in episodes separated by at least one empty frame pair: an
episode is one event, or two in different cells that overlap in time (the second starts while
the first is shown), so "what was shown with X" has one answer. One event covers 1 to 8 tokens
of a 64-frame chunk's 288: a memory that keeps 2% of a chunk (6 tokens) can hold one event but
not every event, and one that keeps the wrong cells holds none.

Everything is deterministic by seed: make_video(seed, frames) gives the same events, pixels and
questions on every machine. Answers are words of the tiny tokenizer (colour, place, digits),
except `describe`, which lists the events and exists so that the memory's generic probe
("Describe what happens in the video.") is a question the model knows, and `choice`, a question
of another family put as one of the benchmarks' multiple-choice prompts (Video-MME, OVO-Bench,
StreamingBench: streamer/engine/benchmark_prompts.py) and answered with the option's letter, so
that the builtin model can be evaluated with those benchmarks' own prompts and scoring. `recount`
is `count` in OVO-Bench's counting (REC) prompt. `pick` ("Which option is red?") needs no video: it
teaches the hop `choice` ends with, from the answer to the option that says it and its letter, on its
own, cheaply (text-only training stages ask it alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory.probe import GENERIC_PROMPTS
from streamer.engine.benchmark_prompts import (lettered, ovo_choice_prompt, ovo_count_prompt, streamingbench_prompt,
                                               videomme_prompt)
from video_io.preprocess import VisionPreset

FRAME = 84
CELL = 28  # one merged 2 x 2 patch of 14 pixels: one LLM token per cell and frame pair
GRID = FRAME // CELL
BUILTIN_PRESET = VisionPreset(min_pixels=FRAME * FRAME, max_pixels=FRAME * FRAME)  # 6 x 6 patches, 9 tokens per pair
DURATIONS = (2, 4, 8, 16)  # frames an event is shown
MIN_GAP_PAIRS = 1  # empty frame pairs between episodes
MIN_EPISODES, MAX_EPISODES = 3, 6
MAX_EVENTS = 8
MAX_REPEATS = 3  # most events of one colour in a video: counts are 0..3
MIN_FRAMES = 16
TINT = 16  # background shade step per cell row (blue) and column (red)

COLOURS = {
    "red": (225, 35, 35), "green": (35, 190, 60), "blue": (45, 85, 235),
    "yellow": (235, 220, 40), "purple": (150, 55, 205), "orange": (250, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
COUNT_ANSWERS = tuple(str(n) for n in range(MAX_REPEATS + 1))

# Question families scored by the synthetic evaluation, and those trained for the benchmark sets and the probe.
QUESTION_KINDS = ("first", "where", "duration", "together", "count")
DESCRIBE = "describe"
TRAIN_KINDS = (*QUESTION_KINDS, DESCRIBE, "last", "choice", "recount", "pick")
TEXT_KINDS = ("pick",)  # those that need no video
CHOICE_BASES = (*QUESTION_KINDS, "last")  # the families a `choice` question puts as multiple choice
# "plain" is how a user might write a multiple-choice question; the builtin learns its letter first and
# fastest (configs/train/builtin_tune.toml), the benchmarks' longer wordings after it
CHOICE_PROMPTS = {"videomme": lambda question, options: videomme_prompt(question, lettered(options)),
                  "ovobench": ovo_choice_prompt, "streamingbench": streamingbench_prompt,
                  "plain": lambda question, options: "\n".join([question, *lettered(options)])}
OPTIONS = 4  # as Video-MME and StreamingBench have; OVO-Bench's items have 2 to 5


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    start: int  # first frame showing the object (even)
    frames: int  # one of DURATIONS
    cell: int  # row * GRID + column
    episode: int  # events of one episode overlap in time; no others do

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def pairs(self) -> range:
        """The frame pairs (LLM time steps) showing the object."""
        return range(self.start // 2, (self.start + self.frames) // 2)


@dataclass(frozen=True)
class QA:
    kind: str  # which kind of question: a key of ASK
    question: str
    answer: str
    choices: int  # answers that were possible: chance is 1 / choices
    options: tuple[str, ...] = ()  # a `choice` question's options, lettered A, B, ... in the prompt
    asked: str = ""  # the question of another kind that a `choice` question puts (its answer: the right option)


def _episode_shapes(rng: np.random.Generator, count: int, doubles: int, longest: int) -> list[list[tuple[int, int]]]:
    """Per episode, its events as (offset in pairs from the episode's start, duration in pairs)."""
    durations = [d // 2 for d in DURATIONS if d // 2 <= longest]
    double_at = set(rng.choice(count, size=doubles, replace=False).tolist())
    episodes = []
    for k in range(count):
        first = int(rng.choice(durations))
        if k not in double_at:
            episodes.append([(0, first)])
            continue
        first = max(first, 2)  # the second event starts while the first is still shown
        offset = int(rng.integers(1, first))
        episodes.append([(0, first), (offset, int(rng.choice(durations)))])
    return episodes


def make_video(seed: int, num_frames: int) -> SyntheticVideo:
    """A video of `num_frames` frames (even, >= MIN_FRAMES) with 3-6 episodes, at least one of two events."""
    if num_frames % 2 or num_frames < MIN_FRAMES:
        raise ValueError(f"a built-in video has an even number of frames, at least {MIN_FRAMES} (--frames); got {num_frames}")
    rng = np.random.default_rng([seed, num_frames])
    pairs = num_frames // 2
    count = int(rng.integers(MIN_EPISODES, MAX_EPISODES + 1))
    doubles = int(rng.integers(1, min(count, MAX_EVENTS - count) + 1))
    longest = max(DURATIONS) // 2
    while True:  # shorter events, then fewer episodes, until they fit (16 frames fit 3 episodes of <= 2 pairs)
        episodes = _episode_shapes(rng, count, doubles, longest)
        spans = [max(offset + length for offset, length in episode) for episode in episodes]
        free = pairs - sum(spans) - MIN_GAP_PAIRS * (count - 1)
        if free >= 0:
            break
        if longest > 1:
            longest //= 2
        else:
            count, doubles = count - 1, min(doubles, count - 1)
    cuts = np.sort(rng.integers(0, free + 1, size=count))
    objects = _event_objects(rng, sum(len(e) for e in episodes))
    events, begin = [], 0
    for k, (episode, span) in enumerate(zip(episodes, spans)):
        start = int(cuts[k]) + begin
        cells = rng.choice(GRID * GRID, size=len(episode), replace=False)
        for (offset, length), cell in zip(episode, cells):
            colour, shape = objects[len(events)]
            events.append(Event(colour, shape, 2 * (start + offset), 2 * length, int(cell), k))
        begin += span + MIN_GAP_PAIRS
    layout = tuple((int(rng.integers(-2, 3)), int(rng.integers(-2, 3)), int(rng.integers(9, 12))) for _ in events)
    return SyntheticVideo(seed, num_frames, int(rng.integers(15, 60)), tuple(events), layout)


def _event_objects(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs; a small palette per video makes colours repeat (for counting)."""
    palette = list(rng.choice(list(COLOURS), size=int(rng.integers(3, len(COLOURS) + 1)), replace=False))
    objects: list[tuple[str, str]] = []
    while len(objects) < count:
        colour, shape = str(rng.choice(palette)), str(rng.choice(SHAPES))
        if (colour, shape) not in objects and sum(c == colour for c, _ in objects) < MAX_REPEATS:
            objects.append((colour, shape))
    return objects


def background(grey: int) -> np.ndarray:
    """(FRAME, FRAME, 3) int16: the grey level, plus TINT of red per cell column and of blue per cell row."""
    cells = np.arange(FRAME) // CELL
    image = np.full((FRAME, FRAME, 3), grey, dtype=np.int16)
    image[:, :, 0] += TINT * cells[None, :]
    image[:, :, 2] += TINT * cells[:, None]
    return image


@dataclass(frozen=True)
class SyntheticVideo:
    seed: int
    num_frames: int
    background: int  # grey level
    events: tuple[Event, ...]  # by start frame
    layout: tuple[tuple[int, int, int], ...]  # per event: centre offset x, y from its cell's centre, radius

    def frames(self) -> list[np.ndarray]:
        """The video as (FRAME, FRAME, 3) uint8 RGB frames."""
        rng = np.random.default_rng([self.seed, self.num_frames, 2])
        noise = rng.integers(-6, 7, size=(self.num_frames, FRAME, FRAME, 3), dtype=np.int16)
        video = (noise + background(self.background)).clip(0, 255).astype(np.uint8)
        for event, (dx, dy, radius) in zip(self.events, self.layout):
            row, column = divmod(event.cell, GRID)
            mask = shape_mask(event.shape, column * CELL + CELL // 2 + dx, row * CELL + CELL // 2 + dy, radius)
            video[event.start:event.start + event.frames, mask] = COLOURS[event.colour]
        return list(video)

    def event_tokens(self) -> np.ndarray:
        """Bool [frame pairs, rows, columns] over the LLM's video tokens: True where an object is shown
        (each object lies inside its cell) -- what an oracle memory keeps."""
        shows = np.zeros((self.num_frames // 2, GRID, GRID), dtype=bool)
        for event in self.events:
            shows[event.pairs.start:event.pairs.stop, event.cell // GRID, event.cell % GRID] = True
        return shows

    def companion(self, event: Event) -> Event | None:
        """The other event of `event`'s episode, if it has one."""
        return next((e for e in self.events if e.episode == event.episode and e != event), None)

    def questions(self, families: tuple[str, ...] = QUESTION_KINDS) -> list[QA]:
        """One question per family, in the order given; deterministic by the video's seed."""
        rng = np.random.default_rng([self.seed, self.num_frames, 1])
        return [ASK[family](self, rng) for family in families]


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
    return QA("last", "What colour appeared last?", video.events[-1].colour, len(COLOURS))


def ask_where(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return where_of(video.events[int(rng.integers(len(video.events)))])


def where_of(event: Event) -> QA:
    return QA("where", f"Where was the {event.name}?", PLACES[event.cell], len(PLACES))


def ask_duration(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    """The duration is drawn first (among those the video has), so answers are spread over DURATIONS."""
    frames = int(rng.choice(sorted({e.frames for e in video.events})))
    event = rng.choice([e for e in video.events if e.frames == frames])
    return QA("duration", f"How many frames did the {event.name} stay?", str(frames), len(DURATIONS))


def ask_together(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    paired = [e for e in video.events if video.companion(e) is not None]
    event = paired[int(rng.integers(len(paired)))]
    return QA("together", f"What colour was shown with the {event.name}?", video.companion(event).colour,
              len(COLOURS))


def ask_count(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    colour, target = count_target(video, rng)
    return QA("count", f"How many times did a {colour} shape appear?", str(target), len(COUNT_ANSWERS))


def count_target(video: SyntheticVideo, rng: np.random.Generator) -> tuple[str, int]:
    """(a colour, how many events have it). The count is drawn first (among those some colour has), so
    answers are spread over 0..3."""
    counts = {colour: sum(e.colour == colour for e in video.events) for colour in COLOURS}
    target = int(rng.choice(sorted(set(counts.values()))))
    return str(rng.choice([c for c, n in counts.items() if n == target])), target


def count_activity(colour: str) -> str:
    """What OVO-Bench's REC prompt counts, in its "How many times did they {activity}?"."""
    return f"show a {colour} shape"


def ask_describe(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return QA(DESCRIBE, GENERIC_PROMPTS[0], ", ".join(e.name for e in video.events), 0)


def answer_space(family: str) -> tuple[str, ...]:
    """Every answer a question of `family` can have."""
    return {"first": tuple(COLOURS), "last": tuple(COLOURS), "together": tuple(COLOURS), "where": PLACES,
            "duration": tuple(str(d) for d in DURATIONS), "count": COUNT_ANSWERS}[family]


# every answer of the CHOICE_BASES families, once ("2" is a duration and a count)
ANSWER_WORDS = tuple(dict.fromkeys(a for f in CHOICE_BASES for a in answer_space(f)))


def multiple_choice(qa: QA, rng: np.random.Generator, options: int = OPTIONS) -> tuple[list[str], int]:
    """`qa`'s answer among `options - 1` others of its family, shuffled: (options, index of the right one)."""
    others = [a for a in answer_space(qa.kind) if a != qa.answer]
    chosen = [qa.answer, *rng.choice(others, size=options - 1, replace=False).tolist()]
    order = rng.permutation(options)
    return [chosen[i] for i in order], int(np.argmax(order == 0))


def ask_choice(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    return as_choice("choice", ASK[CHOICE_BASES[int(rng.integers(len(CHOICE_BASES)))]](video, rng), rng)


def ask_pick(video: SyntheticVideo | None, rng: np.random.Generator) -> QA:
    """Which option is a word of a CHOICE_BASES family's answers: `choice` without the video."""
    family = CHOICE_BASES[int(rng.integers(len(CHOICE_BASES)))]
    word = str(rng.choice(answer_space(family)))
    return as_choice("pick", QA(family, f"Which option is {word}?", word, len(answer_space(family))), rng)


def as_choice(family: str, qa: QA, rng: np.random.Generator) -> QA:
    """`qa` put as multiple choice in one of CHOICE_PROMPTS' wordings, answered with the right option's letter."""
    options, right = multiple_choice(qa, rng)
    prompt = CHOICE_PROMPTS[list(CHOICE_PROMPTS)[int(rng.integers(len(CHOICE_PROMPTS)))]]
    return QA(family, prompt(qa.question, options), chr(65 + right), len(options), tuple(options), qa.question)


def ask_recount(video: SyntheticVideo, rng: np.random.Generator) -> QA:
    colour, target = count_target(video, rng)
    return QA("recount", ovo_count_prompt(count_activity(colour)), str(target), len(COUNT_ANSWERS))


ASK = {"first": ask_first, "where": ask_where, "duration": ask_duration, "together": ask_together,
       "count": ask_count, DESCRIBE: ask_describe, "last": ask_last, "choice": ask_choice, "recount": ask_recount,
       "pick": ask_pick}


# --- long streams: questions about what is happening now, after much else ---------------------------

RECENT_KINDS = ("where", "duration", "together")  # families that name their object, so they can point at the end


def long_stream(seed: int, frames: int, final_frames: int = 96) -> tuple[list[np.ndarray], list[QA]]:
    """A stream of `frames` frames whose last `final_frames` are video `seed`, after generated videos of 384
    frames (cut to fit), and the questions of RECENT_KINDS about that last video whose object never appears
    before it: what a memory must keep of the present once it is full."""
    if frames < final_frames or (frames - final_frames) % 2:
        raise ValueError(f"frames must be >= final_frames and leave an even filler, got {frames}, {final_frames}")
    final = make_video(seed, final_frames)
    filler, earlier, piece = [], set(), 0
    while len(filler) < frames - final_frames:
        video = make_video(10_000_000 + 1000 * seed + piece, 384)
        cut = min(384, frames - final_frames - len(filler))
        filler += video.frames()[:cut]
        earlier |= {e.name for e in video.events if e.start < cut}
        piece += 1
    named = {"where": lambda q: q.question.removeprefix("Where was the ").removesuffix("?"),
             "duration": lambda q: q.question.removeprefix("How many frames did the ").removesuffix(" stay?"),
             "together": lambda q: q.question.removeprefix("What colour was shown with the ").removesuffix("?")}
    questions = [q for q in final.questions(RECENT_KINDS) if named[q.kind](q) not in earlier]
    return filler + final.frames(), questions
