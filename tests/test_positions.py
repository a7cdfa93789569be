"""The M-RoPE position convention of docs/DESIGN.md section 4, on literal examples."""

import pytest
import torch
from conftest import FAMILY_FPS

from streamer.engine.positions import as_position_ids, text_positions, video_positions
from streamer.engine.prompt import pair_opening, pair_seconds


def test_text_positions_are_equal_on_all_axes():
    assert text_positions(5, 3).tolist() == [[5, 5, 5], [6, 6, 6], [7, 7, 7]]
    assert text_positions(0, 0).shape == (0, 3)


def test_video_block_literal():
    # block starting at s=4: 2 frame pairs of a 2 x 3 merged grid, token order t, h, w
    positions = video_positions(block_start=4, first_group=0, groups=2, merged_h=2, merged_w=3)
    expected = [(4 + t, 4 + h, 4 + w) for t in range(2) for h in range(2) for w in range(3)]
    assert [tuple(p) for p in positions.tolist()] == expected
    # the next text token follows the largest position used: s + max(t, h, w) + 1 = 4 + 2 + 1
    assert int(positions.max()) + 1 == 7


def test_stream_continues_temporal_index():
    whole = video_positions(10, 0, 5, 2, 2)
    pieces = torch.cat([video_positions(10, 0, 2, 2, 2), video_positions(10, 2, 1, 2, 2), video_positions(10, 3, 2, 2, 2)])
    assert torch.equal(whole, pieces)


def test_temporal_positions_follow_time():
    # Qwen2.5-VL at 2.5 fps: a pair spans 0.8 s, 2 positions per second -> 1.6 per pair, floored
    positions = video_positions(block_start=4, first_group=0, groups=5, merged_h=1, merged_w=1,
                                pair_step=1.6)
    assert positions[:, 0].tolist() == [4 + t for t in (0, 1, 3, 4, 6)]
    pieces = torch.cat([video_positions(4, 0, 2, 1, 1, 1.6), video_positions(4, 2, 3, 1, 1, 1.6)])
    assert torch.equal(positions, pieces)  # a stream counts frame pairs, so chunks keep the same times


def test_pair_step(family_runner):
    """Qwen2-VL counts frame pairs; Qwen2.5-VL counts tokens_per_second (2) per second of video."""
    qwen25 = hasattr(family_runner.model.config.vision_config, "tokens_per_second")
    assert family_runner.pair_step(FAMILY_FPS) == pytest.approx(2 * 2 / FAMILY_FPS if qwen25 else 1.0, rel=1e-7)
    assert family_runner.pair_step(0.5) == (8.0 if qwen25 else 1.0)


def test_video_block_matches_transformers(family_runner):
    """transformers computes the same positions inside a vision block (it differs only after it), for
    Qwen2.5-VL with the time step its processor derives from the fps (second_per_grid_ts, float32). (Qwen3-VL's
    blocks hold one pair each: its stream is checked against get_rope_index in test_exactness.)"""
    model = family_runner.model
    merge = family_runner.preset.merge_size
    grid = torch.tensor([7, 4, 6])  # patches; merged grid 2 x 3
    step = family_runner.pair_step(FAMILY_FPS)
    vision = model.config.vision_config
    if hasattr(vision, "tokens_per_second"):
        seconds_per_pair = torch.tensor([vision.temporal_patch_size / FAMILY_FPS])  # what the processor returns
        video = model.config.video_token_id
        ids = torch.tensor([[1, 2, *[video] * 42, 3]])
        types = (ids == video).int() * 2  # text 0, video 2
        theirs, _ = model.model.get_rope_index(ids, types, video_grid_thw=grid[None],
                                               second_per_grid_ts=seconds_per_pair)
        theirs = theirs[:, 0, 2:-1]  # the block starts at 2
        assert theirs[0].unique().tolist() == [2 + t for t in (0, 1, 3, 4, 6, 8, 9)]
        ours = video_positions(2, 0, 7, 2, 3, step)
    else:
        theirs = model.model.get_vision_position_ids(7, grid, 1, merge)
        ours = video_positions(7, 0, 7, 2, 3, step)
    assert torch.equal(theirs.t(), ours)


def test_position_ids_layout():
    ids = as_position_ids(video_positions(0, 0, 1, 1, 2), "cpu")
    assert ids.shape == (3, 1, 2)
    assert ids[:, 0].tolist() == [[0, 0], [0, 0], [0, 1]]


def test_qwen3_pair_times_are_the_processors():
    # frame k at k / fps, a pair at the mean of its two frames, an odd last frame paired with itself
    assert pair_seconds(0, 5, 2.5) == [0.2, 1.0, 1.6]
    assert pair_seconds(4, 4, 2.0) == [2.25, 3.25]  # a later chunk continues the stream's frame count
    assert [pair_opening(t) for t in (0.25, 1.0)] == ["<0.2 seconds><|vision_start|>", "<1.0 seconds><|vision_start|>"]


def test_qwen3_chunk_layout_literal(qwen3_runner):
    """Each frame pair: its time as text, <|vision_start|>, a block of its own at temporal index 0 (positions
    (s, s + h, s + w)), <|vision_end|> at 1 + the largest position used; later chunks continue at next_position."""
    memory = qwen3_runner.new_memory()
    prefix = len(qwen3_runner.prefix_ids)
    ids, positions, video_start = qwen3_runner.chunk_layout(memory, 2, 1, 2, 3, 2.0)
    opening = qwen3_runner.encode(pair_opening(0.25))
    assert video_start == prefix
    assert ids == qwen3_runner.prefix_ids + opening + [qwen3_runner.model.config.video_token_id] * 6 + \
        qwen3_runner.encode("<|vision_end|>")
    s = prefix + len(opening)
    expected = text_positions(0, s).tolist() + [[s, s + h, s + w] for h in range(2) for w in range(3)] + \
        [[s + 3] * 3]
    assert positions.tolist() == expected
