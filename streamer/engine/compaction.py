"""Positions for endless streams: the past is re-timed onto fewer positions when a stream would run out of them.

RoPE computes any position, but past max_position_embeddings (or past the distances a model was trained on) its
answers degrade with no error. Keys are stored after RoPE, so moving a stored token means rotating its key by the
difference: RoPE rotates each pair of a key's dimensions by the angle position x frequency of one position
component (M-RoPE: t, h or w, by section or interleaved), and rotations add, so rotating a key that sits at p by
the angles of a shift d gives exactly the key at p + d (float rounding aside). The model's own rotary embedding
gives those angles, so every family is served by the same code.

When the next chunk would pass the memory's position limit, `compact` re-times the video in the memory
(docs/DESIGN.md section 4): the newest quarter of the limit keeps its positions' differences exactly (shifted
back as a block), and everything older is squeezed linearly into the quarter before it, so it stays in order but
its frame pairs move closer together (repeated, the oldest past is squeezed most, as evictions thin it most).
Qwen2-VL and Qwen2.5-VL move only the temporal component (a pair's rows and columns keep theirs); Qwen3-VL, whose
frame pairs are blocks laid out like text, moves all three. The prompt before the video never moves.
"""

from __future__ import annotations

import torch

from memory.store import KVMemory, LayerMemory
from streamer.engine.positions import as_position_ids


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE convention: the two halves of the head dimension form the rotated pairs."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def move_tokens(rotary, layers: list[LayerMemory], shifts: list[torch.Tensor]) -> None:
    """Add shifts[l] [kv_heads, M_l, 3] to layers[l]'s positions and rotate its keys to match. New tensors replace
    the old ones (a fork sharing them is unchanged)."""
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError("this model's rotary embedding scales its angles (attention_scaling != 1): its stored keys "
                         "cannot be moved to new positions")
    for layer, shift in zip(layers, shifts):
        if not bool(shift.any()):
            continue
        heads, count, dim = layer.keys.shape[1], layer.keys.shape[2], layer.keys.shape[3]
        probe = torch.empty(1, device=layer.keys.device, dtype=torch.float32)
        cos, sin = rotary(probe, as_position_ids(shift.reshape(-1, 3), layer.keys.device))
        cos, sin = cos.view(1, heads, count, dim), sin.view(1, heads, count, dim)
        keys = layer.keys.float()
        layer.keys = (keys * cos + rotate_half(keys) * sin).to(layer.keys.dtype)
        layer.positions = layer.positions + shift.to(layer.positions.device)


def compact(rotary, memory: KVMemory, limit: int, moves_all: bool) -> int:
    """Re-time the memory's video so that it ends at most half of `limit` after where the video starts; returns
    how far the stream's end moved back (0: nothing to gain). `moves_all`: a move shifts all three position
    components (Qwen3-VL), else only the temporal one."""
    start, end = memory.video_start, memory.next_position
    target = (limit - start) // 2  # positions the video may span after compaction
    recent = target // 2  # the newest positions, kept exact
    if start is None or end - start <= target or recent < 1:
        return 0
    back = end - start - target  # how far the newest block moves
    ratio = (target - recent) / (end - recent - start)  # the older part is squeezed by this
    components = torch.tensor([1, 1, 1] if moves_all else [1, 0, 0])
    shifts, layers = [], [*memory.layers, *memory.host]  # tokens kept on the host for recall move alike
    for layer in layers:
        t = layer.positions[..., 0].cpu()
        new = torch.where(t >= end - recent, t - back, start + torch.floor((t - start).double() * ratio).long())
        new = torch.where(t < start, t, new)  # the prompt before the video stays
        shifts.append((new - t)[..., None] * components)
    move_tokens(rotary, layers, shifts)
    memory.next_position = end - back
    memory.time_shift += back
    return back

