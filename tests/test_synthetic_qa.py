import re

import numpy as np
import pytest

from streamer.engine.models import tiny_tokenizer
from streamer.builtin.videos import (ASK, COLOURS, EVENT_FRAMES, FAMILIES, FRAME, MAX_EVENTS, MIN_EVENTS, SHAPES,
                                   TRAIN_FAMILIES, Event, SyntheticVideo, make_video, min_frames, shape_mask)


def constructed() -> SyntheticVideo:
    events = (Event("red", "circle", 4), Event("blue", "star", 20), Event("red", "square", 40),
              Event("green", "triangle", 60))
    return SyntheticVideo(seed=7, num_frames=80, background=30, events=events, layout=((28, 28, 20),) * 4)


def test_same_seed_same_video_and_questions():
    a, b = make_video(11, 384), make_video(11, 384)
    assert a == b
    assert a.questions(TRAIN_FAMILIES) == b.questions(TRAIN_FAMILIES)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames(), b.frames()))
    assert make_video(12, 384).events != a.events


@pytest.mark.parametrize("frames", [16, 64, 96, 384])
def test_events_fit_the_layout(frames):
    for seed in range(30):
        video = make_video(seed, frames)
        assert MIN_EVENTS <= len(video.events) <= MAX_EVENTS
        assert len({(e.colour, e.shape) for e in video.events}) == len(video.events)
        for event, nxt in zip(video.events, video.events[1:]):
            assert event.start % 2 == 0 and event.frames == EVENT_FRAMES
            assert nxt.start >= event.start + event.frames + 2  # at least one empty frame pair between
        assert video.events[-1].start + EVENT_FRAMES <= frames


def test_frames_show_the_events_and_nothing_else():
    video = constructed()
    frames = video.frames()
    assert len(frames) == 80 and frames[0].shape == (FRAME, FRAME, 3) and frames[0].dtype == np.uint8
    for i, frame in enumerate(frames):
        shown = [e for e in video.events if e.start <= i < e.start + e.frames]
        centre = frame[28, 28]
        if shown:
            assert tuple(centre) == COLOURS[shown[0].colour]
        else:
            assert np.abs(frame.astype(int) - video.background).max() <= 6  # background plus noise


def test_answers_of_a_constructed_video():
    video = constructed()
    answers = {qa.family: qa for qa in video.questions(TRAIN_FAMILIES)}
    assert answers["first"].answer == "red"
    assert answers["last"].answer == "triangle"
    assert answers["describe"].answer == "red circle, blue star, red square, green triangle"
    after = answers["after"]
    i = next(i for i, e in enumerate(video.events) if f"after the {e.name}?" in after.question)
    assert after.answer == video.events[i + 1].colour
    count = answers["count"]
    colour = count.question.split(" a ")[1].split()[0]
    assert count.answer == str(sum(e.colour == colour for e in video.events))
    order = answers["order"]
    options = dict(re.findall(r"([A-D])\. (\w+ \w+)", order.question))
    assert len(options) == 4 and order.choices == 4
    names = [e.name for e in video.events]
    assert order.answer == min(options, key=lambda letter: names.index(options[letter]))


def test_every_family_over_many_videos():
    """Answers come from closed sets, count answers match the events, and each family's answers vary."""
    seen = {family: set() for family in FAMILIES}
    for seed in range(200):
        video = make_video(seed, 2 * (8 + seed % 185))
        for qa in video.questions():
            seen[qa.family].add(qa.answer)
            if qa.family == "count":
                colour = qa.question.split(" a ")[1].split()[0]
                assert qa.answer == str(sum(e.colour == colour for e in video.events))
            if qa.family == "first":
                assert qa.answer == video.events[0].colour
    assert seen["first"] == seen["after"] == set(COLOURS)
    assert seen["last"] == set(SHAPES)
    assert seen["count"] == {"0", "1", "2", "3"}
    assert seen["order"] == set("ABCD")


def test_answers_are_words_of_the_tiny_tokenizer():
    tokenizer = tiny_tokenizer()
    for word in [*COLOURS, *SHAPES, "0", "1", "2", "3", "A", "B", "C", "D"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_shapes_differ_and_fit_the_frame():
    masks = {shape: shape_mask(shape, 28, 28, 21) for shape in SHAPES}
    for a in SHAPES:
        assert 300 < masks[a].sum() < FRAME * FRAME / 2
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 100, (a, b)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="even"):
        make_video(0, 97)
    with pytest.raises(ValueError, match=str(min_frames(MIN_EVENTS))):
        make_video(0, min_frames(MIN_EVENTS) - 2)
    assert set(ASK) == set(TRAIN_FAMILIES)


def test_event_tokens_mark_the_cells_that_show_an_object():
    video = make_video(5, 96)
    frames = np.stack(video.frames()).astype(int)
    shows = video.event_tokens()
    assert shows.shape == (48, 2, 2)
    # a cell shows an object where a frame of its pair departs from the background by more than the noise
    departs = (np.abs(frames - video.background) > 6).any(axis=-1)  # [frames, H, W]
    cells = departs.reshape(48, 2, 2, 28, 2, 28).any(axis=(1, 3, 5))
    assert np.array_equal(shows, cells)
    assert shows.any(axis=(1, 2)).sum() == len(video.events) * EVENT_FRAMES // 2
