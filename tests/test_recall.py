"""Evicted tokens kept on the host, and questions that bring back the chunks they read (streamer/engine/recall.py)."""

import torch
from conftest import random_frames

from memory.baselines import FullPolicy
from memory.snapshot import load_memory, save_memory
from streamer.engine.decode import EagerDecoder
from streamer.engine.models import model_identity
from streamer.engine.recall import recall

QUESTION = "What happens in the video?"


def held(layer) -> dict:
    """(head, chunk, t, h, w) -> key vector, for every token of a layer."""
    return {(head, int(layer.chunk[head, j]), *layer.positions[head, j].tolist()): layer.keys[0, head, j]
            for head in range(layer.keys.shape[1]) for j in range(len(layer))}


def streamed(runner, frames, **limits):
    memory = runner.new_memory(**limits)
    for start in range(0, len(frames), 4):
        runner.ingest(memory, frames[start:start + 4], FullPolicy())
    return memory


def test_evicted_tokens_go_to_the_host_as_they_were_and_the_device_is_as_without(tiny_runner):
    frames = random_frames(24, seed=21)
    memory, hosted = tiny_runner.new_memory(budget=40, recall=1000), 0
    for start in range(0, len(frames), 4):
        before = [held(layer) for layer in memory.layers]
        counts = [len(layer) for layer in memory.host]
        chunk = memory.chunk_count
        tiny_runner.ingest(memory, frames[start:start + 4], FullPolicy())
        for host, device, count in zip(memory.host, before, counts):
            new = {token: key for token, key in held(host).items() if token not in held_before(host, count)}
            older = {token: key for token, key in new.items() if token[1] != chunk}  # not the chunk's own, cut
            hosted += len(older)
            for token, key in older.items():  # each newly hosted token, bit for bit as it was on the device
                assert torch.equal(key, device[token])
    assert hosted > 0 and any(c.chosen.get("capped") for c in memory.chunks)
    # the device within the budget, the host everything else the policy kept (all of every chunk)
    assert memory.mean_tokens() <= 40 and memory.host[0].keys.device.type == "cpu"
    assert [len(a) + len(b) for a, b in zip(memory.layers, memory.host)] == [memory.full_tokens] * len(memory.layers)
    plain = streamed(tiny_runner, frames, budget=40)
    for a, b in zip(memory.layers, plain.layers):  # keeping evicted tokens changes nothing on the device
        assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)


def held_before(layer, count: int) -> set:
    return {(head, int(layer.chunk[head, j]), *layer.positions[head, j].tolist())
            for head in range(layer.keys.shape[1]) for j in range(count)}


def test_re_timing_moves_the_host_with_the_device(tiny_runner):
    """Past max_positions the past is re-timed: device and host together hold exactly the positions of the
    whole stream re-timed without a budget."""
    frames = random_frames(40, seed=22)
    limits = dict(max_positions=30)
    memory = streamed(tiny_runner, frames, budget=40, recall=1000, **limits)
    whole = streamed(tiny_runner, frames, **limits)
    assert memory.time_shift > 0 and memory.time_shift == whole.time_shift and memory.evicted > 0
    for device, host, everything in zip(memory.layers, memory.host, whole.layers):
        assert sorted(places(device) + places(host)) == sorted(places(everything))


def places(layer) -> list:
    """(head, chunk, t, h, w) of every token (re-timing may put two tokens of a chunk at one place)."""
    return [(head, int(layer.chunk[head, j]), *layer.positions[head, j].tolist())
            for head in range(layer.keys.shape[1]) for j in range(len(layer))]


def test_a_question_brings_back_whole_chunks_within_recall_and_changes_nothing(tiny_runner):
    frames = random_frames(24, seed=23)
    memory = streamed(tiny_runner, frames, budget=40, recall=30)
    ids = tiny_runner.suffix_ids(QUESTION)
    device, host = [held(layer) for layer in memory.layers], [held(layer) for layer in memory.host]
    recalled = recall(tiny_runner, memory, ids)
    extra = [len(a) - len(b) for a, b in zip(recalled.layers, memory.layers)]
    assert 0 < sum(extra) <= 30 * tiny_runner.num_layers
    chunks = set()
    for layer, before, stored in zip(recalled.layers, device, host):
        now = held(layer)
        assert all(torch.equal(now[token], key) for token, key in before.items())  # the device memory, and
        back = {token for token in now if token not in before}  # hosted tokens, as they are on the host
        assert back <= set(stored) and all(torch.equal(now[token], stored[token]) for token in back)
        chunks |= {token[1] for token in back}
    for layer, stored in zip(recalled.layers, memory.host):  # whole chunks: every hosted token of a chosen chunk
        mine = {token for token in held(stored) if token[1] in chunks}
        assert mine <= set(held(layer))
    # the memory itself is unchanged, and the answer goes through the recalled memory
    assert [held(layer).keys() for layer in memory.layers] == [d.keys() for d in device]
    assert tiny_runner.answer(memory, QUESTION, 3, stop_at_end=False).token_ids == \
        tiny_runner.answer(recalled, QUESTION, 3, stop_at_end=False).token_ids
    assert recalled.recall == 0 and recall(tiny_runner, recalled, ids) is recalled  # once per question
    without = tiny_runner.new_memory(budget=40)
    assert recall(tiny_runner, without, ids) is without


def test_a_host_budget_thins_the_host_by_age_and_rank(tiny_runner):
    frames = random_frames(40, seed=25)
    everything = streamed(tiny_runner, frames, budget=40, recall=30)
    bounded = streamed(tiny_runner, frames, budget=40, recall=30, host_budget=60)
    assert sum(len(layer) for layer in everything.host) > 60 * tiny_runner.num_layers, "the test needs a full host"
    assert sum(len(layer) for layer in bounded.host) <= 60 * tiny_runner.num_layers
    for all_of, part in zip(everything.host, bounded.host):
        assert set(places(part)) <= set(places(all_of))  # what it keeps, it kept as the unbounded host did
        assert part.chunk.float().mean() > all_of.chunk.float().mean()  # the old thinned most
    for a, b in zip(bounded.layers, everything.layers):  # the device is the same either way
        assert torch.equal(a.keys, b.keys)


def test_a_snapshot_keeps_recall_and_focus_but_not_the_host(tiny_runner, tmp_path):
    memory = streamed(tiny_runner, random_frames(16, seed=24), budget=40, recall=30, host_budget=50, focus=20)
    save_memory(memory, tmp_path / "m.safetensors", model_identity(tiny_runner.model, tiny_runner.model_name))
    loaded, _ = load_memory(tmp_path / "m.safetensors", model_identity(tiny_runner.model, tiny_runner.model_name))
    assert loaded.recall == 30 and loaded.host_budget == 50 and all(len(layer) == 0 for layer in loaded.host)
    assert len(loaded.host) == tiny_runner.num_layers and loaded.focus == 20


def video_chunks(layer) -> set:
    return {int(c) for c in layer.chunk[torch.isfinite(layer.importance)].tolist()}


def texts(layer) -> set:
    return {token for token, finite in zip(held(layer), torch.isfinite(layer.importance).flatten().tolist())
            if not finite}


def test_a_focused_question_reads_only_the_chunks_it_attends_to_most(tiny_runner):
    """With focus, a question reads whole chunks of the device and the host, the ones its probe attends to most,
    within focus tokens per layer on average, and every text token; the memory itself is unchanged."""
    frames = random_frames(24, seed=24)
    memory = streamed(tiny_runner, frames, budget=40, recall=30)
    ids = tiny_runner.suffix_ids(QUESTION)
    readable = [{**held(a), **held(b)} for a, b in zip(memory.layers, memory.host)]
    memory.focus = 25
    focused = recall(tiny_runner, memory, ids)
    assert focused.focus == 0 and focused.recall == 0 and focused.host == []
    assert recall(tiny_runner, focused, ids) is focused  # once per question
    chosen = video_chunks(focused.layers[0])
    everything = set().union(*(video_chunks(layer) for layer in memory.layers + memory.host))
    assert chosen and chosen < everything  # some chunks, not all
    used = 0.0
    for layer, device, tokens in zip(focused.layers, memory.layers, readable):
        now = held(layer)
        assert all(torch.equal(now[token], tokens[token]) for token in now)  # read as they were kept
        assert set(now) == {t for t in tokens if t[1] in chosen} | texts(device)  # whole chunks and the text
        used += sum(t[1] in chosen for t in tokens) / tiny_runner.kv_heads
    assert used <= 25 * tiny_runner.num_layers
    # the chunk the question attends to most, over device and host alike, is among them
    forward = EagerDecoder(tiny_runner).probe(
        [(torch.cat([a.keys, b.keys], 2), torch.cat([a.values, b.values], 2)) for a, b in zip(memory.layers, memory.host)],
        memory.next_position, ids, rows=1)
    score = {}
    for a, b, attention in zip(memory.layers, memory.host, forward.attention):
        chunk, finite = torch.cat([a.chunk, b.chunk.to(a.chunk.device)], 1), torch.cat([a.importance, b.importance], 1)
        for c, value in zip(chunk[finite.isfinite()].tolist(), attention[finite.isfinite()].tolist()):
            score[c] = score.get(c, 0.0) + value
    assert max(score, key=score.get) in chosen
    # the memory is unchanged and answers through its focus; focus over everything reads everything
    assert [held(layer).keys() for layer in memory.layers] == [{t for t in d if t in held(m)} for d, m in
                                                                zip(readable, memory.layers)]
    assert tiny_runner.answer(memory, QUESTION, 3, stop_at_end=False).token_ids == \
        tiny_runner.answer(focused, QUESTION, 3, stop_at_end=False).token_ids
    memory.focus = 10**6
    whole = recall(tiny_runner, memory, ids)
    assert [set(held(layer)) for layer in whole.layers] == [set(tokens) for tokens in readable]
    plain = streamed(tiny_runner, frames, budget=40)  # no host: the device's chunks only
    plain.focus = 25
    assert video_chunks(recall(tiny_runner, plain, ids).layers[0]) <= video_chunks(plain.layers[0])
