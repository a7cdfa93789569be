import numpy as np
import pytest

from streamer.builtin.videos import (ASK, CELL, CHOICE_PROMPTS, COLOURS, DURATIONS, QUESTION_KINDS, FRAME, GRID, MAX_EPISODES,
                                     MAX_EVENTS, MAX_REPEATS, MIN_EPISODES, MIN_FRAMES, OPTIONS, PLACES, SHAPES,
                                     TEXT_KINDS, TRAIN_KINDS, Event, SyntheticVideo, background, make_video,
                                     shape_mask)
from streamer.engine.models import tiny_tokenizer


def constructed() -> SyntheticVideo:
    events = (Event("red", "circle", 4, 8, 0, 0), Event("blue", "star", 6, 2, 4, 0),
              Event("red", "square", 20, 16, 8, 1), Event("green", "triangle", 40, 4, 5, 2))
    return SyntheticVideo(seed=7, num_frames=64, background=30, events=events, layout=((0, 0, 11),) * 4)


def test_same_seed_same_video_and_questions():
    a, b = make_video(11, 384), make_video(11, 384)
    assert a == b
    assert a.questions(TRAIN_KINDS) == b.questions(TRAIN_KINDS)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames(), b.frames()))
    assert make_video(12, 384).events != a.events


@pytest.mark.parametrize("frames", [MIN_FRAMES, 18, 48, 96, 384])
def test_events_fit_the_layout(frames):
    for seed in range(40):
        video = make_video(seed, frames)
        events = video.events
        episodes = sorted({e.episode for e in events})
        assert MIN_EPISODES <= len(episodes) <= MAX_EPISODES and len(events) <= MAX_EVENTS
        assert len({(e.colour, e.shape) for e in events}) == len(events)
        assert max(sum(e.colour == c for e in events) for c in COLOURS) <= MAX_REPEATS
        assert any(video.companion(e) for e in events)
        assert [e.start for e in events] == sorted(e.start for e in events)
        for event in events:
            assert event.start % 2 == 0 and event.frames in DURATIONS and 0 <= event.cell < GRID * GRID
            assert event.start + event.frames <= frames
            other = video.companion(event)
            if other is not None:  # the two of an episode overlap, in different cells; nothing else overlaps
                assert other.cell != event.cell and set(event.pairs) & set(other.pairs)
                first, second = sorted([event, other], key=lambda e: e.start)
                assert first.start < second.start < first.start + first.frames
        for k in episodes[1:]:  # at least one empty pair between episodes
            before = max(e.pairs.stop for e in events if e.episode == k - 1)
            assert min(e.pairs.start for e in events if e.episode == k) >= before + 1


def test_frames_show_the_events_in_their_cells_on_a_shaded_background():
    video = constructed()
    frames = np.stack(video.frames()).astype(int)
    assert frames.shape == (64, FRAME, FRAME, 3)
    shade = background(video.background)
    for i, frame in enumerate(frames):
        for cell in range(GRID * GRID):
            row, column = divmod(cell, GRID)
            centre = frame[row * CELL + CELL // 2, column * CELL + CELL // 2]
            shown = [e for e in video.events if e.cell == cell and e.start <= i < e.start + e.frames]
            if shown:
                assert tuple(centre) == COLOURS[shown[0].colour]
            else:
                assert np.abs(centre - shade[row * CELL, column * CELL]).max() <= 6
    # the background's shade tells the cells apart: red grows to the right, blue downwards
    assert shade[0, CELL, 0] - shade[0, 0, 0] > 12 and shade[CELL, 0, 2] - shade[0, 0, 2] > 12


def test_answers_of_a_constructed_video():
    video = constructed()
    rng = np.random.default_rng(0)
    assert ASK["first"](video, rng).answer == "red"
    assert ASK["describe"](video, rng).answer == "red circle, blue star, red square, green triangle"
    for _ in range(20):
        where = ASK["where"](video, rng)
        event = next(e for e in video.events if f"the {e.name}?" in where.question)
        assert where.answer == PLACES[event.cell]
        duration = ASK["duration"](video, rng)
        event = next(e for e in video.events if f"the {e.name} stay" in duration.question)
        assert duration.answer == str(event.frames)
        together = ASK["together"](video, rng)
        assert together.answer == ("blue" if "red circle" in together.question else "red")
    assert PLACES[4] == "middle" and PLACES[5] == "right"


def test_every_family_over_many_videos():
    """Answers come from closed sets, match the events, and each family's answers vary."""
    seen = {family: set() for family in QUESTION_KINDS}
    for seed in range(200):
        video = make_video(seed, 2 * (8 + seed % 185))
        for qa in video.questions():
            seen[qa.kind].add(qa.answer)
            if qa.kind == "count":
                colour = qa.question.split(" a ")[1].split()[0]
                assert qa.answer == str(sum(e.colour == colour for e in video.events))
            if qa.kind == "first":
                assert qa.answer == video.events[0].colour
    assert seen["first"] == seen["together"] == set(COLOURS)
    assert seen["where"] == set(PLACES)
    assert seen["duration"] == {str(d) for d in DURATIONS}
    assert seen["count"] == {"0", "1", "2", "3"}


def test_answers_are_words_of_the_tiny_tokenizer():
    tokenizer = tiny_tokenizer()
    for word in [*COLOURS, *SHAPES, *(str(d) for d in DURATIONS), "0", "1", "2", "3", "top", "left", "middle",
                 "right", "bottom"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_shapes_differ_and_fit_a_cell():
    masks = {shape: shape_mask(shape, CELL // 2 + 2, CELL // 2 + 2, 11) for shape in SHAPES}
    for a in SHAPES:
        assert 100 < masks[a].sum() and not masks[a][CELL:].any() and not masks[a][:, CELL:].any()
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 40, (a, b)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="even"):
        make_video(0, 97)
    with pytest.raises(ValueError, match=str(MIN_FRAMES)):
        make_video(0, MIN_FRAMES - 2)
    assert set(ASK) == set(TRAIN_KINDS)


def test_event_tokens_mark_the_cells_that_show_an_object():
    video = make_video(5, 96)
    frames = np.stack(video.frames()).astype(int)
    shows = video.event_tokens()
    assert shows.shape == (48, GRID, GRID)
    # a cell shows an object where a frame of its pair departs from the background by more than the noise
    departs = (np.abs(frames - background(video.background)) > 6).any(axis=-1)  # [frames, H, W]
    cells = departs.reshape(48, 2, GRID, CELL, GRID, CELL).any(axis=(1, 3, 5))
    assert np.array_equal(shows, cells)
    assert shows.sum() == sum(e.frames // 2 for e in video.events)


def test_pick_asks_for_the_option_that_says_a_word_without_a_video():
    rng = np.random.default_rng(0)
    wordings = set()
    for _ in range(200):
        qa = ASK["pick"](None, rng)
        word = qa.asked.removeprefix("Which option is ").removesuffix("?")
        assert qa.kind == "pick" and qa.options[ord(qa.answer) - 65] == word and len(set(qa.options)) == OPTIONS
        assert qa.asked in qa.question and f"{qa.answer}. {word}" in qa.question
        wording = (k for k, prompt in CHOICE_PROMPTS.items() if prompt(qa.asked, list(qa.options)) == qa.question)
        wordings.add(next(wording))
    assert wordings == set(CHOICE_PROMPTS) and set(TEXT_KINDS) <= set(TRAIN_KINDS)
