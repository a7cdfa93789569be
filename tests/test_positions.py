"""The M-RoPE position convention of docs/DESIGN.md section 4, on literal examples."""

import torch

from streamer.engine.positions import as_position_ids, text_positions, video_positions


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


def test_video_block_matches_transformers(tiny_runner):
    """transformers computes the same positions inside a vision block (it differs only after it)."""
    merge = tiny_runner.preset.merge_size
    grid = torch.tensor([3, 4, 6])  # patches; merged grid 2 x 3
    theirs = tiny_runner.model.model.get_vision_position_ids(7, grid, 1, merge)
    ours = video_positions(7, 0, 3, 2, 3)
    assert torch.equal(theirs.t(), ours)


def test_position_ids_layout():
    ids = as_position_ids(video_positions(0, 0, 1, 1, 2), "cpu")
    assert ids.shape == (3, 1, 2)
    assert ids[:, 0].tolist() == [[0, 0], [0, 0], [0, 1]]
