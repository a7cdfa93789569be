"""Answers stepped together give each session what it gets alone (streamer/engine/generation.py):
the same greedy tokens and first-token log-probabilities within 1e-5 (float32), on each family, over
memories whose lengths differ per layer and per session, with answers joining and leaving between steps.
The service's executor on top of it: tests/test_server.py and test_executor below."""

import torch
from conftest import FAMILY_FPS, random_frames, stream

from memory.registry import make_policy
from streamer.engine.generation import advance

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
