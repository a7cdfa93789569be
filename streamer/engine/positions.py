"""Absolute M-RoPE positions, computed by the project (docs/DESIGN.md section 4).

Text token k after position p gets (p + k, p + k, p + k). A vision block that starts at s
gives the token at temporal group t, merged row h, merged column w the position
(s + T(t), s + h, s + w), where T(t) = t for Qwen2-VL and floor(t x pair_step) for Qwen2.5-VL,
whose temporal positions follow absolute time (pair_step: positions per frame pair, see
Runner.pair_step). The first text token after the block gets 1 + the largest position
used so far. A stream is one open vision block whose temporal index keeps counting across
chunks, so a chunked stream gets exactly the positions of the same frames given as one video.
Qwen3-VL's frame pairs are each a block of one pair (temporal index 0) between text tokens, laid out
by Runner.chunk_layout with these two functions.
Positions are returned as [n, 3] int64 tensors in token order.
"""

from __future__ import annotations

import torch


def text_positions(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count).unsqueeze(1).expand(-1, 3).contiguous()


def video_positions(block_start: int, first_group: int, groups: int, merged_h: int, merged_w: int,
                    pair_step: float = 1.0) -> torch.Tensor:
    """Positions of `groups` frame pairs whose first pair is the stream's pair number `first_group`.

    Token order is the vision tower's output order: temporal group, then merged row, then merged column.
    The product is taken in float32, as transformers takes it, so every checkpoint sees its training positions.
    """
    pairs = torch.arange(first_group, first_group + groups)
    t = (pairs * pair_step).long().view(-1, 1, 1).expand(groups, merged_h, merged_w)
    h = torch.arange(merged_h).view(1, -1, 1).expand(groups, merged_h, merged_w)
    w = torch.arange(merged_w).view(1, 1, -1).expand(groups, merged_h, merged_w)
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3) + block_start


def as_position_ids(positions: torch.Tensor, device) -> torch.Tensor:
    """[n, 3] -> the (3, batch=1, n) layout the rotary embedding takes."""
    return positions.t().unsqueeze(1).to(device)
