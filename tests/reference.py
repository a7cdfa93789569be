"""Full recomputation references for the exactness tests, and a test policy they share.

Each reference runs the stock transformers forward over the whole token sequence at once
(prefix + all video tokens + question), with the video encoded in one vision-tower call,
and with no cache: nothing of the project's chunking, memory or attention is involved
except the position convention, which the position tests check separately.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from memory.policy import ChunkContext, MemoryPolicy, Selection
from streamer.engine.attention import MEMORY_ATTENTION
from streamer.engine.positions import as_position_ids, text_positions, video_positions
from streamer.engine.runner import DEFAULT_FPS, Runner
from video_io.preprocess import preprocess_frames

REFERENCE_ATTENTION = "test_reference_masked"


def one_video_inputs(runner: Runner, frames: list[np.ndarray], question: str, fps: float = DEFAULT_FPS):
    """Token ids, positions [n, 3], patches and the suffix length of one prompt of the whole video."""
    patches = preprocess_frames(frames, runner.preset)
    if runner.family.timestamps:
        return qwen3_inputs(runner, patches, len(frames), question, fps)
    grid_t, grid_h, grid_w = patches.grid_thw
    merge = runner.preset.merge_size
    prefix, suffix = runner.prefix_ids, runner.suffix_ids(question)
    video_token = runner.model.config.video_token_id
    ids = prefix + [video_token] * patches.num_tokens + suffix
    video = video_positions(len(prefix), 0, grid_t, grid_h // merge, grid_w // merge, runner.pair_step(fps))
    positions = torch.cat([text_positions(0, len(prefix)), video, text_positions(int(video.max()) + 1, len(suffix))])
    return ids, positions, patches, len(suffix)


def qwen3_inputs(runner: Runner, patches, frames: int, question: str, fps: float):
    """Qwen3-VL's prompt as its processor writes it -- each frame pair's time (frame index / fps, averaged over
    the pair, the last frame repeated if odd) as text, then the pair's own vision block -- tokenized whole,
    at the positions transformers' get_rope_index gives it."""
    grid_t, grid_h, grid_w = patches.grid_thw
    indices = [min(i, frames - 1) for i in range(2 * grid_t)]  # frame pairs
    times = [(indices[2 * k] / fps + indices[2 * k + 1] / fps) / 2 for k in range(grid_t)]
    frame = "<|video_pad|>" * (patches.num_tokens // grid_t)
    video = "".join(f"<{seconds:.1f} seconds><|vision_start|>{frame}<|vision_end|>" for seconds in times)
    text = runner.layout.prefix + video + runner.layout.question_suffix(question)
    ids = runner.tokenizer(text, add_special_tokens=False).input_ids
    types = (torch.tensor([ids]) == runner.model.config.video_token_id).int() * 2  # text 0, video 2
    positions, _ = runner.model.model.get_rope_index(torch.tensor([ids]), types,
                                                     video_grid_thw=torch.tensor([patches.grid_thw]))
    return ids, positions[:, 0].t(), patches, len(runner.suffix_ids(question))


@torch.inference_mode()
def one_shot_logits(runner: Runner, frames, question: str, generated: list[int] = (), key_mask=None,
                    fps: float = DEFAULT_FPS) -> torch.Tensor:
    """Logits at the question (and generated) positions from one stock forward over everything.

    key_mask, if given, is a function (layer_idx, seq_len) -> bool [kv_heads, seq_len, seq_len]
    of extra visibility (ANDed with causality), used to mimic per-layer, per-head pruning.
    """
    ids, positions, patches, suffix_len = one_video_inputs(runner, frames, question, fps)
    ids = ids + list(generated)
    if generated:
        start = int(positions.max()) + 1
        positions = torch.cat([positions, text_positions(start, len(generated))])
    model = runner.model
    implementation = "sdpa"
    if key_mask is not None:
        implementation = REFERENCE_ATTENTION

        def masked(module, query, key, value, attention_mask, **kwargs):
            seq = query.shape[2]
            causal = torch.ones(seq, seq, dtype=torch.bool).tril()
            visible = key_mask(module.layer_idx, seq) & causal
            groups = query.shape[1] // key.shape[1]
            mask = visible.repeat_interleave(groups, dim=0).unsqueeze(0)
            return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)

        AttentionInterface.register(REFERENCE_ATTENTION, masked)
    model.set_attn_implementation({"text_config": implementation})
    try:
        out = model(
            input_ids=torch.tensor([ids]), pixel_values_videos=patches.pixel_values,
            video_grid_thw=torch.tensor([patches.grid_thw]), position_ids=as_position_ids(positions, "cpu"),
            use_cache=False,
        )
    finally:
        model.set_attn_implementation({"text_config": MEMORY_ATTENTION})
    return out.logits[0, -(suffix_len + len(generated)):].float()


def one_shot_greedy(runner: Runner, frames, question: str, steps: int, fps: float = DEFAULT_FPS) -> list[int]:
    """Greedy decoding by recomputing the whole sequence for every new token."""
    tokens: list[int] = []
    for _ in range(steps):
        token = int(one_shot_logits(runner, frames, question, tokens, fps=fps)[-1].argmax())
        if token in runner.stop_ids:
            break
        tokens.append(token)
    return tokens


class RaggedSubsetPolicy(MemoryPolicy):
    """Keeps a random, different number of tokens in every layer and a different subset per head
    (recorded in kept_by_chunk), so that layers end up holding caches of different lengths."""

    name = "test-ragged"

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.kept_by_chunk: list[list[torch.Tensor]] = []

    def select(self, ctx: ChunkContext) -> Selection:
        kept = []
        for _ in range(ctx.model.num_layers):
            k = int(torch.randint(1, ctx.chunk_len + 1, (1,), generator=self.generator))
            kept.append(torch.stack([torch.randperm(ctx.chunk_len, generator=self.generator)[:k].sort().values
                                     for _ in range(ctx.model.kv_heads)]))
        self.kept_by_chunk.append(kept)
        return Selection(kept=kept)
