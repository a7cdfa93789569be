"""Chunked prefill into the memory equals one stock forward over the whole video (float32, a tiny model of
each family, at a frame rate that is not an integer)."""

import pytest
import torch
from conftest import FAMILY_FPS, question_logits, random_frames, stream
from reference import RaggedSubsetPolicy, one_shot_greedy, one_shot_logits, one_video_inputs

from memory.baselines import FullPolicy, UniformPolicy
from streamer.engine.stream import ingest_video, with_newest

QUESTION = "What happens in the video?"


@pytest.mark.parametrize("frame_count, chunk_frames", [(12, 2), (12, 4), (12, 6), (12, 12), (12, 10000), (11, 4)])
def test_chunked_logits_equal_one_shot(family_runner, frame_count, chunk_frames):
    frames = random_frames(frame_count)
    memory = stream(family_runner, frames, chunk_frames, fps=FAMILY_FPS)
    chunked = question_logits(family_runner, memory, QUESTION)
    reference = one_shot_logits(family_runner, frames, QUESTION, fps=FAMILY_FPS)
    assert chunked.shape == reference.shape
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    assert memory.tokens_per_layer() == [memory.full_tokens] * family_runner.num_layers


def test_greedy_decoding_equals_one_shot(family_runner):
    frames = random_frames(8, seed=1)
    memory = stream(family_runner, frames, 2, fps=FAMILY_FPS)
    answer = family_runner.answer(memory, QUESTION, max_new_tokens=6)
    assert answer.token_ids == one_shot_greedy(family_runner, frames, QUESTION, steps=6, fps=FAMILY_FPS)
    # the memory is not changed by answering: a second answer is identical
    assert family_runner.answer(memory, QUESTION, max_new_tokens=6).token_ids == answer.token_ids


def test_stream_positions_equal_one_video(family_runner):
    frames = random_frames(10, seed=2)
    _, positions, _, suffix_len = one_video_inputs(family_runner, frames, QUESTION, FAMILY_FPS)
    for chunk_frames in (2, 4, 10):
        memory = stream(family_runner, frames, chunk_frames, fps=FAMILY_FPS)
        for layer in memory.layers:
            for head_positions in layer.positions:
                assert torch.equal(head_positions, positions[:-suffix_len])
        assert memory.next_position == int(positions[:-suffix_len].max()) + 1


def test_ragged_per_layer_memory_equals_masked_recomputation(family_runner):
    """Layers holding different token subsets answer exactly as a full forward that hides, per layer and
    head, the dropped tokens from everything after their own chunk."""
    frames = random_frames(8, seed=3)
    chunk_frames = 2
    policy = RaggedSubsetPolicy(seed=0)
    memory = stream(family_runner, frames, chunk_frames, policy, fps=FAMILY_FPS)
    counts = memory.tokens_per_layer()
    assert len(set(counts)) > 1, "the test policy should leave layers with different lengths"

    chunk_lens = [report.tokens for report in memory.chunks]
    chunk_of = torch.cat([torch.full((n,), c) for c, n in enumerate(chunk_lens)])

    def key_mask(layer, seq):
        heads = family_runner.kv_heads
        question_len = seq - len(chunk_of)
        key_chunk = torch.cat([chunk_of, torch.full((question_len,), -1)])
        kept = torch.zeros(heads, seq, dtype=torch.bool)
        kept[:, len(chunk_of):] = True  # question tokens are never pruned
        offset = 0
        for c, n in enumerate(chunk_lens):
            for head in range(heads):
                kept[head, offset + policy.kept_by_chunk[c][layer][head]] = True
            offset += n
        same_chunk = key_chunk[:, None].eq(key_chunk[None, :]) & key_chunk[:, None].ge(0)  # [query, key]
        return kept[:, None, :] | same_chunk[None]

    chunked = question_logits(family_runner, memory, QUESTION)
    reference = one_shot_logits(family_runner, frames, QUESTION, key_mask=key_mask, fps=FAMILY_FPS)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    full = one_shot_logits(family_runner, frames, QUESTION, fps=FAMILY_FPS)
    assert (chunked - full).abs().max() > 1e-3, "pruning should change the answer logits"


def test_a_stream_keeps_the_rate_of_its_first_chunk(family_runner):
    """Later chunks continue at the stream's rate; another rate is refused before any work, memory unchanged."""
    frames = random_frames(8, seed=4)
    memory = stream(family_runner, frames[:4], 4, fps=FAMILY_FPS)
    with pytest.raises(ValueError, match="frame rate changed mid-stream"):
        family_runner.ingest(memory, frames[4:], FullPolicy(), fps=FAMILY_FPS + 1)
    assert memory.frames == 4 and memory.fps == FAMILY_FPS
    family_runner.ingest(memory, frames[4:], FullPolicy())  # no rate given: the stream's own
    whole = stream(family_runner, frames, 4, fps=FAMILY_FPS)
    assert memory.next_position == whole.next_position
    torch.testing.assert_close(question_logits(family_runner, memory, QUESTION),
                               question_logits(family_runner, whole, QUESTION), atol=1e-5, rtol=0)


def test_stream_tokens_equal_one_video(family_runner, monkeypatch):
    """The chunks' token ids, one after the other, are the one-video prompt's (Qwen3-VL: each pair's time
    and vision tokens as its processor writes them, tokenized as one text), whatever the chunking."""
    frames = random_frames(11, seed=5)
    ids, _, _, suffix_len = one_video_inputs(family_runner, frames, QUESTION, FAMILY_FPS)
    layout = family_runner.chunk_layout
    for chunk_frames in (2, 4, 10000):
        streamed = []
        monkeypatch.setattr(family_runner, "chunk_layout",
                            lambda *args: (result := layout(*args), streamed.extend(result[0]))[0])
        stream(family_runner, frames, chunk_frames, fps=FAMILY_FPS)
        assert streamed + family_runner.suffix_ids(QUESTION) == ids


def test_prompt_ids_are_the_one_video_prompts(family_runner):
    """What the repetition penalty counts: every token id of the one-video prompt (Qwen3-VL: each pair's time)."""
    frames = random_frames(11, seed=6)
    ids, _, _, _ = one_video_inputs(family_runner, frames, QUESTION, FAMILY_FPS)
    memory = stream(family_runner, frames, 4, fps=FAMILY_FPS)
    assert family_runner.prompt_ids(memory, family_runner.suffix_ids(QUESTION)) == set(ids)


def test_a_question_mid_chunk_sees_a_last_chunk_and_the_memory_goes_on_without_it(family_runner):
    """with_newest: the frames since the last chunk, seen as if the stream had ended there (a short last chunk,
    pruned by the stream's policy), in a fork; the memory itself is untouched and continues in whole chunks."""
    frames, policy = random_frames(12, seed=4), UniformPolicy(ratio=0.5)
    memory = stream(family_runner, frames[:8], 4, policy, fps=FAMILY_FPS)
    before = [(layer.keys.clone(), layer.positions.clone()) for layer in memory.layers]
    seen = with_newest(family_runner, memory, frames[8:11], policy, 4, fps=FAMILY_FPS)
    ended = stream(family_runner, frames[:11], 4, policy, fps=FAMILY_FPS)
    torch.testing.assert_close(question_logits(family_runner, seen, QUESTION),
                               question_logits(family_runner, ended, QUESTION), atol=0, rtol=0)
    assert seen.frames == 11 and memory.frames == 8 and len(memory.chunks) == 2
    for layer, (keys, positions) in zip(memory.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.positions, positions)
    ingest_video(family_runner, frames[8:], policy, 4, memory, fps=FAMILY_FPS)
    unasked = stream(family_runner, frames, 4, policy, fps=FAMILY_FPS)
    torch.testing.assert_close(question_logits(family_runner, memory, QUESTION),
                               question_logits(family_runner, unasked, QUESTION), atol=0, rtol=0)
    assert with_newest(family_runner, memory, [], policy, 4) is memory
