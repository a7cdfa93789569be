"""Chunks of several streams ingested together (streamer/engine/together.py) take the decisions each takes alone:
the same ratios, kept tokens and evictions, probe answers within 1e-5 (float32), on each family, with policies,
budgets and stream lengths that differ per session, sessions joining and leaving between rounds, and a chunk
that fails. The service's executor on top of it: tests/test_executor.py."""

from dataclasses import replace

import pytest
import torch
from conftest import FAMILY_FPS, random_frames

from memory.registry import make_policy
from streamer.config import load_config
from streamer.engine import together
from streamer.engine.packed import run_segments
from streamer.engine.together import ingest_together


def sessions():
    """(policy, memory budget, frames per chunk, chunks): four streams whose memories differ per layer and session."""
    config = load_config("stream_default")
    default = config.make_policy()  # EMLoC with drafted probe answers, the service's live default
    strict = make_policy("emloc", dict(delta=0.002, group_size=1), replace(config.probe, answer_tokens=3))
    return [
        (default, 96, 2, 5),
        (strict, None, 4, 3),
        (make_policy("pyramid", dict(ratio=0.3)), 64, 2, 4),
        (make_policy("recent", dict(frames=2)), None, 2, 4),
    ]


def plan(runner):
    """Per session its memory, policy and chunks of frames."""
    out = []
    for seed, (policy, budget, per_chunk, chunks) in enumerate(sessions()):
        frames = random_frames(per_chunk * chunks, seed=10 + seed)
        out.append(dict(memory=runner.new_memory(budget=budget), policy=policy,
                        chunks=[frames[i:i + per_chunk] for i in range(0, len(frames), per_chunk)]))
    return out


def ingest(runner, session, chunk):
    return runner.ingest(session["memory"], chunk, session["policy"], fps=FAMILY_FPS)


def assert_close(mine, theirs, path="chosen"):
    if isinstance(theirs, float):
        assert mine == pytest.approx(theirs, abs=1e-5), path
    elif isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), path
        for key in theirs:
            assert_close(mine[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), path
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert_close(a, b, f"{path}[{i}]")
    else:
        assert mine == theirs, path


def assert_same_memory(mine, theirs):
    assert mine.tokens_per_layer() == theirs.tokens_per_layer()
    assert mine.next_position == theirs.next_position
    assert mine.probe_drafts == theirs.probe_drafts  # the probes' greedy answers: the same tokens
    for a, b in zip(mine.layers, theirs.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.chunk, b.chunk)  # the same tokens kept
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


def test_chunks_ingested_together_take_the_decisions_each_takes_alone(family_runner, monkeypatch):
    runner = family_runner
    packed = []  # per packed forward, its segments' first layers

    def spy(runner_, segments):
        packed.append([s.start for s in segments])
        return run_segments(runner_, segments)

    monkeypatch.setattr(together, "run_segments", spy)
    alone, joint = plan(runner), plan(runner)
    records_alone = [[ingest(runner, s, chunk) for chunk in s["chunks"]] for s in alone]
    evaluated = [sum(len(r.chosen.get("evaluations", [])) for r in records) for records in records_alone]
    assert evaluated[0] > 0 and evaluated[1] > 0  # EMLoC ran candidate re-runs in both its sessions

    # session 2 joins at round 1; session 1 has 3 chunks, so it leaves after round 2
    joins = {0: [0, 1, 3], 1: [2]}
    next_chunk, records_joint, rounds = {}, [[] for _ in joint], 0
    while True:
        for i in joins.get(rounds, []):
            next_chunk[i] = 0
        ready = [i for i, c in next_chunk.items() if c < len(joint[i]["chunks"])]
        if not ready:
            break
        outcomes = ingest_together(runner, [lambda i=i: ingest(runner, joint[i], joint[i]["chunks"][next_chunk[i]])
                                            for i in ready])
        for i, (record, error) in zip(ready, outcomes):
            assert error is None
            records_joint[i].append(record)
            next_chunk[i] += 1
        rounds += 1
    for records, records_ref, s, ref in zip(records_joint, records_alone, joint, alone):
        for record, reference in zip(records, records_ref, strict=True):
            assert_close(record.chosen, reference.chosen)
            assert record.evicted == reference.evicted
            assert "waited" not in reference.timings
            assert 0 <= record.timings.get("waited", 0.0) < record.timings["policy"]  # its wait, within its stages
        assert_same_memory(s["memory"], ref["memory"])
    assert max(map(len, packed)) == 3  # the three probing sessions' forwards ran packed...
    assert any(len(set(starts)) > 1 for starts in packed)  # ...re-runs from different layers among them


def test_a_chunk_that_fails_together_fails_alone(tiny_runner, monkeypatch):
    """A chunk whose ingest raises, and a packed forward that raises, fail only the chunks they reach; the
    other sessions' chunks are ingested as alone and the failed memories are unchanged."""
    runner = tiny_runner
    alone, joint = plan(runner)[:3], plan(runner)[:3]
    for s in alone:
        ingest(runner, s, s["chunks"][0])

    def broken():
        raise RuntimeError("this chunk is broken")

    before = joint[1]["memory"].tokens_per_layer()
    outcomes = ingest_together(runner, [lambda: ingest(runner, joint[0], joint[0]["chunks"][0]), broken,
                                        lambda: ingest(runner, joint[2], joint[2]["chunks"][0])])
    assert [error is None for _, error in outcomes] == [True, False, True]
    assert "broken" in str(outcomes[1][1])
    assert joint[1]["memory"].tokens_per_layer() == before
    assert_same_memory(joint[0]["memory"], alone[0]["memory"])
    assert_same_memory(joint[2]["memory"], alone[2]["memory"])

    # a packed forward that fails (e.g. out of memory) fails the chunks in it; a later round works again
    calls = {"n": 0}

    def failing(runner_, segments):
        calls["n"] += 1
        if len(segments) > 1:
            raise RuntimeError("out of memory")
        return run_segments(runner_, segments)

    monkeypatch.setattr(together, "run_segments", failing)
    lengths = [s["memory"].tokens_per_layer() for s in joint]
    outcomes = ingest_together(runner, [lambda: ingest(runner, joint[0], joint[0]["chunks"][1]),
                                        lambda: ingest(runner, joint[2], joint[2]["chunks"][1])])
    assert all("out of memory" in str(error) for _, error in outcomes) and calls["n"] == 1
    assert [s["memory"].tokens_per_layer() for s in joint] == lengths  # nothing committed
    monkeypatch.undo()
    outcomes = ingest_together(runner, [lambda: ingest(runner, joint[0], joint[0]["chunks"][1])])
    assert outcomes[0][1] is None


def test_chunks_together_pack_their_probes_where_a_static_decoder_exists(tiny_runner, monkeypatch):
    """On a GPU a chunk alone probes through the static decoder (CUDA graphs over one set of buffers, one forward
    at a time); chunks together take packed eager forwards instead, and decide as the static decoder does alone.
    Here the static decoder runs its eager path (CPU)."""
    from streamer.engine.decode import StaticDecoder

    runner = tiny_runner
    monkeypatch.setattr(runner, "static_decoder", StaticDecoder(runner, cuda_graphs=False))
    packed = []

    def spy(runner_, segments):
        packed.append(len(segments))
        return run_segments(runner_, segments)

    monkeypatch.setattr(together, "run_segments", spy)
    alone, joint = plan(runner)[:3], plan(runner)[:3]
    for s in alone:
        for chunk in s["chunks"][:2]:
            ingest(runner, s, chunk)
    for round_ in range(2):
        outcomes = ingest_together(runner, [lambda s=s: ingest(runner, s, s["chunks"][round_]) for s in joint])
        assert all(error is None for _, error in outcomes), outcomes
    for s, ref in zip(joint, alone):
        for record, reference in zip(s["memory"].chunks, ref["memory"].chunks, strict=True):
            assert_close(record.chosen, reference.chosen)
        assert_same_memory(s["memory"], ref["memory"])
    assert packed and max(packed) == 3  # the three sessions' probe forwards, packed
