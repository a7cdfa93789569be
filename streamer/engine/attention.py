"""Attention for a language model whose layers hold key/value caches of different lengths.

After pruning, layer l's cache holds M_l memory tokens, and M_l differs between layers, so
the causal mask transformers builds from layer 0's length is wrong for every other layer.
This function derives causality from the shapes it is given: the queries are the last `q`
positions of the keys (memory first, then the new tokens), so query i may see every key up to
`kv - q + i` -- a lower-right causal mask. Using the `causal_lower_right` bias instead of a
materialised mask keeps SDPA's fused kernels. The one exception is streamer.engine.decode's static
buffers, whose keys are not in that order: their caller passes a bool [q, kv] mask itself.

Two optional keyword arguments serve the memory policies' short probe forwards, which reach
this function through the decoder layers' **kwargs:
- key_masks: {layer_idx: bool [kv_heads, kv]} hides keys per KV head (a pruning candidate
  evaluated without copying the cache), or {layer_idx: bool [kv_heads, q, kv]}: the whole
  visibility of every query (several candidates in one forward, streamer.engine.decode);
- attention_recorder: called as recorder(layer_idx, probs) with the probe rows' attention
  probabilities, float32 [kv_heads, groups, q, kv] (queries grouped by the KV head they share).
A third serves packed forwards of several sessions (streamer.engine.packed): `segments`, their
cache, whose rows of the sequence each attend to their own keys, with their own key masks and
recorder: one call per segment, as alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

MEMORY_ATTENTION = "streamer_memory"
# transformers 5.24 renamed the decoder layers' `past_key_values` to `cache` (the old name warns and goes
# in 5.40); 5.18 knows only the old one.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2VLDecoderLayer.forward).parameters else "past_key_values"


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, cache, **kwargs) -> torch.Tensor:
    """One decoder layer over `hidden`, reading and extending `cache` (whatever the argument is called)."""
    return layer(hidden, use_cache=True, **{_CACHE_ARGUMENT: cache}, **kwargs)


def memory_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     key_masks=None, attention_recorder=None, segments=None, **kwargs):
    """query [B, Hq, q, D]; key/value [B, Hkv, kv, D]. Returns [B, q, Hq, D].

    attention_mask, if given, is the caller's bool visibility, [q, kv] or per KV head
    [Hkv, q, kv] (streamer.engine.decode's static buffers), or per batch row [B, Hkv, q, kv]
    (streamer.engine.static_batch's seats); otherwise the q new tokens are the last q keys and the
    mask is lower-right causal. B is 1 but for static_batch's steps.
    """
    if segments is not None:  # each segment's queries over its own keys (streamer.engine.packed.Packed)
        return torch.cat([memory_attention(module, query[:, :, a:b], keys, values, scaling=scaling, **extra)[0]
                          for (a, b), (keys, values), extra in zip(segments.bounds, segments.latest, segments.extras)],
                         dim=1), None
    q_len, kv_len = query.shape[2], key.shape[2]
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    key_mask = key_masks.get(module.layer_idx) if key_masks else None
    visible = attention_mask
    if key_mask is not None and key_mask.dim() == 3:
        visible, key_mask = key_mask, None
    if visible is None and (key_mask is not None or attention_recorder is not None):
        # probe forwards (few queries): an explicit mask is cheap and can hide keys per head
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if visible is not None and key_mask is not None:
        visible = visible & key_mask[:, None, :]
    if attention_recorder is not None:
        attention_recorder(module.layer_idx, _probabilities(query, key, visible, scaling))
    if visible is not None:
        return _masked_attention(query, key, value, visible, scaling), None
    mask = causal_lower_right(q_len, kv_len) if 1 < q_len < kv_len else None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=q_len > 1 and q_len == kv_len, scale=scaling,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def _fold(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, q, D] -> [B, Hkv, groups * q, D]: the query heads that share a KV head become its rows,
    so attention under a mask needs no grouped-query support and never repeats the keys."""
    return query.reshape(query.shape[0], kv_heads, -1, query.shape[-1])


def _folded_mask(visible: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """bool [q, kv], [Hkv, q, kv] or per batch row [B, Hkv, q, kv] -> [1 or B, Hkv or 1, groups * q, kv],
    rows in _fold's order."""
    if visible.dim() == 2:
        return visible.repeat(groups, 1)[None, None]
    if visible.dim() == 3:
        return visible.repeat(1, groups, 1)[None]
    return visible.repeat(1, 1, groups, 1)


def _masked_attention(query, key, value, visible, scaling):
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    mask = _folded_mask(visible, kv_heads, heads // kv_heads)
    out = F.scaled_dot_product_attention(_fold(query, kv_heads), key, value, attn_mask=mask, scale=scaling)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous()


def _probabilities(query, key, visible, scaling) -> torch.Tensor:
    """Float32 attention probabilities of every query row, [Hkv, groups, q, kv]."""
    _, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = (_fold(query.float(), kv_heads) @ key.float().transpose(2, 3)) * (scaling or dim ** -0.5)
    scores = scores.masked_fill(~_folded_mask(visible, kv_heads, groups), float("-inf"))
    return scores.softmax(dim=-1).view(kv_heads, groups, q_len, kv_len)


def register_memory_attention() -> None:
    AttentionInterface.register(MEMORY_ATTENTION, memory_attention)
