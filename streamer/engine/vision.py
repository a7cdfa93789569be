"""The vision tower (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) on one video chunk, its frame pairs batched into one
attention call.

The stock tower attends within each frame pair (temporal patch) separately, and without a flash
attention build it does so in a Python loop: one attention call per frame pair and layer, 6,144
calls for a 384-frame video on the 7B model. In a video chunk every frame pair has the same
h x w patches, so the pairs are a batch: [pairs, heads, h*w, head_dim] goes through one
scaled_dot_product_attention. The model's own modules do the rest (patch embedding, norms, qkv
and output projections, MLPs, merger); only the orchestration and the 2-D rotary angles, which
are the same for every pair, are computed here. tests/test_vision.py checks the result against
the stock tower.

Qwen2.5-VL's tower attends within windows of the merged-token grid in every block but
`fullatt_block_indexes`, where it attends over the whole frame pair. Both stay within one frame
pair, so a chunk is still encoded exactly on its own. The stock tower permutes the patches into
window order and back; here the windows are a mask over the pair's patches in the processor's
order instead, which gives the same result (attention does not depend on the order of its keys,
and the permutation moves whole merge blocks, so the merger sees the same patches together).

Qwen3-VL's tower attends over the whole frame pair in every block too. It adds learned position
embeddings, a square table resampled (bilinear, corners aligned) to the pair's patch grid -- the same for
every pair, so computed once here -- and returns DeepStack features besides the merged tokens: the hidden
state after each of `deepstack_visual_indexes`' blocks through its own merger, which the runner adds to
the decoder's hidden state after its first layers (Runner.forward_layers). All of it stays within a frame
pair, so a chunk is still encoded exactly on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from streamer.engine.models import VisionShape

# Without a fused kernel (CPU) attention materialises pairs x heads x (h*w)^2 scores: cap them.
MAX_SCORES = 2**27


def patch_rotary(inv_freq: torch.Tensor, grid_h: int, grid_w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, head_dim] of the 2-D rotary of one frame pair's patches, in the processor's
    order (merge x merge blocks, row-major within and across blocks): the first half of the angles
    follows the patch row, the second half its column, and each half is repeated for rotate_half."""
    rows = torch.arange(grid_h, device=inv_freq.device)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, device=inv_freq.device)[None, :].expand(grid_h, grid_w)

    def in_patch_order(index: torch.Tensor) -> torch.Tensor:
        blocks = index.reshape(grid_h // merge, merge, grid_w // merge, merge).permute(0, 2, 1, 3)
        return blocks.flatten().float()

    angles = torch.cat([torch.outer(in_patch_order(rows), inv_freq), torch.outer(in_patch_order(cols), inv_freq)], -1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def window_mask(grid_h: int, grid_w: int, merge: int, window: int) -> torch.Tensor:
    """bool [h*w, h*w]: which patches of one frame pair see each other in a window block. Windows are
    `window` x `window` merged tokens from the top left corner (cut by the frame's edge), as in the
    stock tower's window index."""
    rows = torch.arange(grid_h)[:, None].expand(grid_h, grid_w) // (merge * window)
    cols = torch.arange(grid_w)[None, :].expand(grid_h, grid_w) // (merge * window)
    blocks = (rows * grid_w + cols).reshape(grid_h // merge, merge, grid_w // merge, merge).permute(0, 2, 1, 3)
    windows = blocks.flatten()  # each patch's window, in the processor's patch order
    return windows[:, None] == windows[None, :]


def batched_attention(attn: torch.nn.Module, hidden: torch.Tensor, pairs: int, cos: torch.Tensor,
                      sin: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One VisionAttention module over hidden [pairs * h*w, dim], each pair attending to itself
    (within `mask` [h*w, h*w], if given)."""
    heads = attn.num_heads
    q, k, v = attn.qkv(hidden).reshape(pairs, -1, 3, heads, attn.head_dim).unbind(2)  # [pairs, h*w, heads, d]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # in float32, as the stock tower
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [pairs, heads, h*w, d]
    step = pairs if hidden.is_cuda else max(1, MAX_SCORES // (heads * q.shape[2] ** 2))
    out = torch.cat([F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step],
                                                    attn_mask=mask, scale=attn.scaling)
                     for i in range(0, pairs, step)])
    return attn.proj(out.transpose(1, 2).reshape(hidden.shape))


def learned_positions(visual: torch.nn.Module, grid_h: int, grid_w: int) -> torch.Tensor:
    """Qwen3-VL's position embeddings of one frame pair's patches [h*w, dim], in the processor's order: the
    learned square table resampled to the patch grid as the stock tower resamples it (float32)."""
    side = visual.num_grid_per_side
    table = visual.pos_embed.weight.float().view(side, side, -1).permute(2, 0, 1)[None]  # [1, dim, side, side]
    # the tower's own settings where it states them (bilinear with aligned corners in the releases)
    grid = F.interpolate(table, size=(grid_h, grid_w), mode=getattr(visual, "interpolation_mode", "bilinear"),
                         align_corners=getattr(visual, "interpolation_align_corners", True))[0]
    merge = visual.spatial_merge_size
    blocks = grid.permute(1, 2, 0).reshape(grid_h // merge, merge, grid_w // merge, merge, -1).permute(0, 2, 1, 3, 4)
    return blocks.reshape(grid_h * grid_w, -1)


def encode_pairs(visual: torch.nn.Module, shape: VisionShape, pixels: torch.Tensor,
                 grid_thw: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Vision tower on one chunk's patches (pixels [t*h*w, channels*patch volume]) -> the merged
    video tokens [t*h*w / merge^2, hidden], equal to the stock tower's pooler output, and the DeepStack
    features (one [t*h*w / merge^2, hidden] per feature block; Qwen3-VL's, none for the other families).
    `shape` (the family's VisionShape) says which blocks attend within windows and which feed DeepStack."""
    pairs, grid_h, grid_w = grid_thw
    merge = visual.spatial_merge_size
    cos, sin = patch_rotary(visual.rotary_pos_emb.inv_freq.float(), grid_h, grid_w, merge)
    windows = None
    if shape.window is not None:
        windows = window_mask(grid_h, grid_w, merge, shape.window // merge).to(pixels.device)
    hidden = visual.patch_embed(pixels)
    deepstack = shape.deepstack
    if shape.learned_positions:
        hidden = hidden + learned_positions(visual, grid_h, grid_w).to(hidden.dtype).repeat(pairs, 1)
    features = []
    for index, block in enumerate(visual.blocks):
        mask = None if index in shape.full_blocks else windows
        hidden = hidden + batched_attention(block.attn, block.norm1(hidden), pairs, cos, sin, mask)
        hidden = hidden + block.mlp(block.norm2(hidden))
        if index in deepstack:
            features.append(visual.deepstack_merger_list[deepstack.index(index)](hidden))
    return visual.merger(hidden), features
