"""Answers stepped together give each session what it gets alone (streamer/engine/generation.py):
the same greedy tokens and first-token log-probabilities within 1e-5 (float32), on each family, over
memories whose lengths differ per layer and per session, with answers joining and leaving between steps.
The service's executor on top of it: tests/test_server.py and test_executor below."""

import math

import torch
from conftest import FAMILY_FPS, random_frames, stream

import pytest

from memory.registry import make_policy
from streamer.engine import static_batch
from streamer.engine.generation import advance
from streamer.engine.static_batch import StaticBatch

QUESTIONS = ["What happens in the video?", "Which colour is first?", "Describe it.", "Is anything moving now?"]


def memories(runner):
    """Four memories that differ in length per layer and per session: different policies, budgets and lengths."""
    return [
        stream(runner, random_frames(8, seed=1), 2, fps=FAMILY_FPS),
        stream(runner, random_frames(12, seed=2), 4, make_policy("pyramid"), fps=FAMILY_FPS),
        stream(runner, random_frames(8, seed=3), 2, make_policy("uniform", dict(ratio=0.4)), budget=64,
               fps=FAMILY_FPS),
        stream(runner, random_frames(6, seed=4), 2, make_policy("recent", dict(frames=2)), fps=FAMILY_FPS),
    ]


def assert_same(alone, together):
    assert together.token_ids == alone.token_ids
    for mine, theirs in zip(together.first_token_logprobs, alone.first_token_logprobs):
        assert mine["id"] == theirs["id"]
        assert abs(mine["logprob"] - theirs["logprob"]) < 1e-5
    torch.testing.assert_close(together.first_logits, alone.first_logits, atol=1e-5, rtol=0)


def test_answers_stepped_together_equal_each_alone(family_runner):
    runner = family_runner
    stored = memories(runner)
    lengths = [m.tokens_per_layer() for m in stored]
    assert len({tuple(n) for n in lengths}) == len(stored)  # every session's memory differs...
    assert any(len(set(n)) > 1 for n in lengths)  # ...and one of them per layer too
    alone = [runner.answer(m, q, max_new_tokens=7, stop_at_end=False) for m, q in zip(stored, QUESTIONS)]

    # answers 0 and 1 start together; 2 joins at step 2 and 3 at step 4, while the others decode
    joins = {0: [0, 1], 2: [2], 4: [3]}
    generations, step = {}, 0
    while step == 0 or any(not g.done for g in generations.values()):
        for i in joins.get(step, []):
            generations[i] = runner.begin(stored[i], QUESTIONS[i], 7, stop_at_end=False, packed=True)
        advance(runner, list(generations.values()))
        step += 1
    for i, g in generations.items():
        assert_same(alone[i], g.answer(runner.tokenizer))
    assert [m.tokens_per_layer() for m in stored] == lengths  # answering never changes a memory


def test_a_generation_that_leaves_mid_answer_changes_no_other(tiny_runner):
    stored = memories(tiny_runner)[:3]
    alone = [tiny_runner.answer(m, q, max_new_tokens=8, stop_at_end=False) for m, q in zip(stored, QUESTIONS)]
    generations = [tiny_runner.begin(m, q, 8, stop_at_end=False, packed=True) for m, q in zip(stored, QUESTIONS)]
    for _ in range(3):
        advance(tiny_runner, generations)
    left = generations.pop(1)  # cancelled: the executor drops it from the next step on
    while not all(g.done for g in generations):
        advance(tiny_runner, generations)
    assert left.tokens == alone[1].token_ids[:3]
    for g, expected in zip(generations, [alone[0], alone[2]]):
        assert_same(expected, g.answer(tiny_runner.tokenizer))


def test_streamed_text_and_stops_are_per_answer(tiny_runner):
    """Stop tokens end one answer without ending the others; each streams its own text, in whole characters."""
    stored = memories(tiny_runner)[:2]
    alone = [tiny_runner.answer(m, q, max_new_tokens=12) for m, q in zip(stored, QUESTIONS)]
    pieces = [[], []]
    generations = [tiny_runner.begin(m, q, 12, on_text=into.append, packed=True)
                   for m, q, into in zip(stored, QUESTIONS, pieces)]
    while not all(g.done for g in generations):
        advance(tiny_runner, generations)
    for g, expected, into in zip(generations, alone, pieces):
        assert_same(expected, g.answer(tiny_runner.tokenizer))
        assert "".join(into) == expected.text
        assert g.view is None  # the answer's copy of the memory is freed when it is done


@pytest.mark.parametrize("buckets", [static_batch.BUCKETS, (1, 2)])
def test_seated_answers_equal_each_alone(family_runner, monkeypatch, buckets):
    """On a GPU the service's answers take seats of fixed buffers stepped as one CUDA graph per batch size
    (streamer/engine/static_batch.py); its eager path gives each answer what it gets alone. Answers join at
    different steps, the later ones with longer contexts (the buffers grow under the seated ones), one leaves
    mid-answer (the last seat's answer moves into its seat), and with two seats only the others take the
    packed steps beside them."""
    runner = family_runner
    monkeypatch.setattr(static_batch, "BUCKETS", buckets)
    stored = sorted(memories(runner), key=lambda m: max(m.tokens_per_layer()))
    alone = [runner.answer(m, q, max_new_tokens=7, stop_at_end=False) for m, q in zip(stored, QUESTIONS)]
    monkeypatch.setattr(runner, "static_batch", StaticBatch(runner, cuda_graphs=False))
    monkeypatch.setattr(static_batch, "_round_up", lambda tokens: math.ceil(tokens))  # grow at every longer context
    monkeypatch.setattr(static_batch, "CONTEXT_GROWTH", 1.0)
    joins, leaves = {0: [0], 1: [1], 2: [2], 3: [3]}, {4: 0}
    generations, step = {}, 0
    while step == 0 or any(not g.done for g in generations.values()):
        for i in joins.get(step, []):
            generations[i] = runner.begin(stored[i], QUESTIONS[i], 7, stop_at_end=False, packed=True)
            assert generations[i].batch is runner.static_batch
        if step in leaves:  # cancelled: the executor releases it and drops it from the next step on
            left = generations.pop(leaves[step])
            left.release()
        advance(runner, list(generations.values()))
        if step == 0:
            first_slots = runner.static_batch.context_slots
        if step == 3:  # four answers in flight: the third and fourth seated only if there are four seats
            assert all((generations[i].seat is not None) == (buckets[-1] >= 4) for i in (2, 3))
            assert not runner.static_batch.trim(), "seats in use are never freed"
        step += 1
    assert left.tokens == alone[0].token_ids[:4]
    for i, g in generations.items():
        assert_same(alone[i], g.answer(runner.tokenizer))
    batch = runner.static_batch
    assert batch.seated == [] and batch.seats == min(4, buckets[-1]), "every seat freed; buffers grew to a bucket"
    if buckets[-1] >= 4:  # the buffers grew under the seated answers, up to the longest context
        assert batch.context_slots >= max(max(m.tokens_per_layer()) for m in stored) > first_slots


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_seated_answers_replayed_as_cuda_graphs_equal_each_alone():
    from conftest import TEST_PRESET

    from streamer.engine.models import load_model
    from streamer.engine.runner import Runner

    runner = Runner(load_model("tiny-random", device="cuda", dtype="float32"), preset=TEST_PRESET)
    stored = memories(runner)
    batch = runner.static_batch
    assert batch is not None and batch.cuda_graphs, "a runner on a GPU seats the answers stepped together"
    alone = [runner.answer(m, q, max_new_tokens=7, stop_at_end=False) for m, q in zip(stored, QUESTIONS)]
    for _ in range(2):  # the second round replays the graphs recorded in the first
        generations = [runner.begin(m, q, 7, stop_at_end=False, packed=True) for m, q in zip(stored, QUESTIONS)]
        while not all(g.done for g in generations):
            advance(runner, generations)
        for g, expected in zip(generations, alone):
            assert_same(expected, g.answer(runner.tokenizer))
    assert batch.cuda_graphs and batch.graphs, "graphs should have been recorded, not skipped"


def test_an_answer_with_no_memory_for_a_seat_takes_the_packed_steps(tiny_runner, monkeypatch):
    """Larger seat buffers that do not fit on the device leave the seated answers as they were; the answer that
    asked for them is stepped packed beside them, and every answer is what it is alone."""
    stored = memories(tiny_runner)[:3]
    alone = [tiny_runner.answer(m, q, max_new_tokens=6, stop_at_end=False) for m, q in zip(stored, QUESTIONS)]
    batch = StaticBatch(tiny_runner, cuda_graphs=False)
    monkeypatch.setattr(tiny_runner, "static_batch", batch)
    generations = [tiny_runner.begin(m, q, 6, stop_at_end=False, packed=True) for m, q in zip(stored, QUESTIONS)]
    advance(tiny_runner, generations[:2])  # two seats

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    monkeypatch.setattr(batch, "_reserve", no_memory)
    while not all(g.done for g in generations):
        advance(tiny_runner, generations)
        if generations[2].first_logits is not None:
            assert generations[2].seat is None and generations[2].batch is None
    for g, expected in zip(generations, alone):
        assert_same(expected, g.answer(tiny_runner.tokenizer))
    assert batch.seats == 2 and batch.seated == []


def test_a_question_that_fails_in_its_seat_leaves_no_seat_taken(tiny_runner, monkeypatch):
    batch = StaticBatch(tiny_runner, cuda_graphs=False)
    monkeypatch.setattr(tiny_runner, "static_batch", batch)
    generation = tiny_runner.begin(memories(tiny_runner)[0], QUESTIONS[0], 4, packed=True)

    def fails(*args):
        raise RuntimeError("CUDA error: an illegal memory access (a test)")

    monkeypatch.setattr(batch, "_question", fails)
    with pytest.raises(RuntimeError, match="a test"):
        advance(tiny_runner, [generation])
    assert batch.seated == [] and generation.seat is None
    generation.release()  # what the executor does for a failed step
    assert batch.trim() and batch.keys == []
