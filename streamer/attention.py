"""Attention for a language model whose layers hold key/value caches of different lengths.

After pruning, layer l's cache holds M_l memory tokens, and M_l differs between layers, so
the causal mask transformers builds from layer 0's length is wrong for every other layer.
This function derives causality from the shapes it is given: the queries are the last `q`
positions of the keys (memory first, then the new tokens), so query i may see every key up to
`kv - q + i` -- a lower-right causal mask. Using the `causal_lower_right` bias instead of a
materialised mask keeps SDPA's fused kernels. The one exception is streamer.decode's static
buffers, whose keys are not in that order: their caller passes a bool [q, kv] mask itself.

Two optional keyword arguments serve the memory policies' short probe forwards, which reach
this function through the decoder layers' **kwargs:
- key_masks: {layer_idx: bool [kv_heads, kv]} hides keys per KV head (a pruning candidate
  evaluated without copying the cache);
- attention_recorder: called as recorder(layer_idx, probs) with the probe rows' attention
  probabilities, float32 [kv_heads, groups, q, kv] (queries grouped by the KV head they share).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

MEMORY_ATTENTION = "streamer_memory"


def memory_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     key_masks=None, attention_recorder=None, **kwargs):
    """query [B, Hq, q, D]; key/value [B, Hkv, kv, D] with the q new tokens last. Returns [B, q, Hq, D]."""
    if attention_mask is not None:
        if key_masks or attention_recorder is not None:
            raise ValueError("an explicit attention mask cannot be combined with key_masks or a recorder")
        return _masked_attention(query, key, value, attention_mask, scaling)
    q_len, kv_len = query.shape[2], key.shape[2]
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    key_mask = key_masks.get(module.layer_idx) if key_masks else None
    mask, is_causal = None, False
    if key_mask is not None or attention_recorder is not None:
        # probe forwards (few queries): an explicit mask is cheap and can hide keys per head
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        mask = mask.expand(heads, q_len, kv_len)
        if key_mask is not None:
            mask = mask & key_mask.repeat_interleave(groups, dim=0)[:, None, :]
        mask = mask.unsqueeze(0)
    elif q_len > 1 and kv_len == q_len:
        is_causal = True
    elif q_len > 1:
        mask = causal_lower_right(q_len, kv_len)
    if attention_recorder is not None:
        # queries grouped by KV head: [1, Hkv, groups * q, D] @ [1, Hkv, D, kv], no key copies
        grouped = query.float().reshape(1, kv_heads, groups * q_len, -1)
        scores = (grouped @ key.float().transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
        scores = scores.view(kv_heads, groups, q_len, kv_len)
        scores = scores.masked_fill(~mask[0].reshape(kv_heads, groups, q_len, kv_len), float("-inf"))
        attention_recorder(module.layer_idx, scores.softmax(dim=-1))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def _masked_attention(query, key, value, visible, scaling):
    """SDPA under a bool [q, kv] mask, the query heads folded onto the KV head they share.

    [1, Hq, q, D] becomes [1, Hkv, groups * q, D], so no backend needs grouped-query support
    with a mask and the keys are never repeated per query head.
    """
    _, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = query.reshape(1, kv_heads, groups * q_len, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=visible.repeat(groups, 1), scale=scaling)
    return out.view(1, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register_memory_attention() -> None:
    AttentionInterface.register(MEMORY_ATTENTION, memory_attention)
