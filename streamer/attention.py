"""Attention for a language model whose layers hold key/value caches of different lengths.

After pruning, layer l's cache holds M_l memory tokens, and M_l differs between layers, so
the causal mask transformers builds from layer 0's length is wrong for every other layer.
This function receives no prebuilt mask and derives causality from the shapes it is given:
the queries are the last `q` positions of the keys (memory first, then the new tokens), so
query i may see every key up to `kv - q + i` -- a lower-right causal mask. Using the
`causal_lower_right` bias instead of a materialised mask keeps SDPA's fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

MEMORY_ATTENTION = "streamer_memory"


def memory_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, q, D]; key/value [B, Hkv, kv, D] with the q new tokens last. Returns [B, q, Hq, D]."""
    if attention_mask is not None:
        raise ValueError("memory attention derives its own mask; the model must not pass one")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, is_causal = None, False
    if q_len > 1 and kv_len == q_len:
        is_causal = True
    elif q_len > 1:
        mask = causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_memory_attention() -> None:
    AttentionInterface.register(MEMORY_ATTENTION, memory_attention)
