"""The probe: a short prompt run after the memory and the full current chunk.

It tells a policy two things about the chunk it just prefilled (docs/DESIGN.md section 2):
- how much each chunk token matters, per KV head: the probe queries' attention to the chunk's
  keys, averaged over the query heads sharing the KV head, summed over probe tokens, smoothed
  along token order. Only the probe rows of attention are computed.
- what the model would say with the chunk unpruned: reference logits at the probe's last K
  positions, against which pruning candidates are judged by Jensen-Shannon divergence.

A probe is a prompt (the instruction of a question turn, "<|vision_end|>...assistant\\n") plus
`answer_tokens` tokens the model generates greedily after it, so that the JS positions are
the model's own answer about the video rather than template text. Its positions continue
after the chunk, as if the video ended there. The engine runs it (ChunkModel.probe below,
implemented in streamer/engine/probing.py); this module holds its options, the interface a
policy sees it through, and the maths on what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

GENERIC_PROMPTS = ("Describe what happens in the video.",)


@dataclass
class ProbeConfig:
    mode: str = "generic"  # generic: fixed prompts, memory serves any later question; question: the question is the probe
    prompts: list[str] = field(default_factory=lambda: list(GENERIC_PROMPTS))
    js_positions: int = 16  # K: last probe positions whose next-token distributions are compared
    answer_tokens: int = 15  # greedy tokens appended to each prompt
    # True: the answer stops at its first <|im_end|>, and only the positions that predict it (the answer's
    # tokens and that <|im_end|>) are compared, at most js_positions of them. False (the paper): the last
    # js_positions positions, which after a short answer are mostly <|im_end|> repeated.
    answer_only: bool = False
    smoothing: int = 5  # average-pool kernel along token order (1 = none)

    def validate(self) -> "ProbeConfig":
        if self.mode not in ("generic", "question"):
            raise ValueError(f"probe mode must be 'generic' or 'question', got {self.mode!r}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("probe prompts must be a non-empty list of non-empty strings")
        if self.js_positions < 1 or self.answer_tokens < 0:
            raise ValueError(f"need js_positions >= 1 and answer_tokens >= 0, got {self.js_positions}, "
                             f"{self.answer_tokens}")
        if self.smoothing < 1 or self.smoothing % 2 == 0:
            raise ValueError(f"probe smoothing must be an odd kernel size >= 1, got {self.smoothing}")
        return self


class ChunkProbe(Protocol):
    """One probe forward after the memory and the full chunk."""

    attention: list[torch.Tensor]  # per layer [kv_heads, chunk_len] float32: the probe's attention to each
    #                                chunk token, mean over the query heads of a KV head, summed over probe tokens
    reference: torch.Tensor  # [rows, vocab] float32 logits of the probe's last rows, chunk unpruned

    def rerun(self, from_layer: int, keeps: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Per candidate, the probe's logits [rows, vocab] with chunk tokens hidden per layer and KV head:
        keep[l] is bool [kv_heads, chunk_len] for the layers given (others see the whole chunk). Layers from
        `from_layer` up are re-run from their stored input, so no layer below `from_layer` may be in a keep.
        The engine runs all candidates in one forward: a weight-bound forward costs about the same for
        several as for one."""


class ChunkModel(Protocol):
    """The model as a policy sees it while a chunk is being ingested."""

    num_layers: int
    kv_heads: int

    def probe(self, prompt: str, config: ProbeConfig) -> ChunkProbe:
        """Run `prompt` (and config.answer_tokens greedy tokens, see ProbeConfig.answer_only) after the
        memory and the full chunk; `reference` holds the logits of the compared positions."""



def chunk_importance(runs: list[ChunkProbe], smoothing: int) -> list[torch.Tensor]:
    """Per layer [kv_heads, chunk_len]: the probes' attention to the chunk's tokens, summed over
    probes, average-pooled along token order."""
    scores = []
    for layer_attention in zip(*(run.attention for run in runs)):
        total = torch.stack(layer_attention).sum(dim=0)
        if smoothing > 1:
            total = F.avg_pool1d(total[None], smoothing, stride=1, padding=smoothing // 2, count_include_pad=False)[0]
        scores.append(total)
    return scores


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, reduce: str = "mean") -> float:
    """Jensen-Shannon divergence of the next-token distributions in nats (0 .. ln 2), the mean (or the
    max) over positions. Float32 throughout: in bf16 the log-probabilities are too coarse and give NaN."""
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    per_position = 0.5 * (kl_pm + kl_qm)
    total = per_position.max() if reduce == "max" else per_position.mean()
    return float(total.clamp(0.0, math.log(2.0)))  # float32 rounding can leave the range


def ratio_tokens(ratio: float, video_tokens: int) -> int:
    """How many of a chunk's video tokens a ratio keeps: ceil(ratio * video tokens)."""
    return min(math.ceil(round(ratio * video_tokens, 6)), video_tokens)


def keep_top(importance: torch.Tensor, protected: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool [kv_heads, chunk_len]: per head the ceil(ratio * video tokens) most important video
    tokens, plus every protected (text) token."""
    return keep_count(importance, protected, ratio_tokens(ratio, int((~protected).sum())))


def keep_count(importance: torch.Tensor, protected: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [kv_heads, chunk_len]: per head the `count` most important video tokens, plus every
    protected (text) token."""
    scores = importance.masked_fill(protected.to(importance.device), float("inf"))
    index = scores.topk(count + int(protected.sum()), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)


def outlier_count(importance: torch.Tensor, protected: torch.Tensor, factor: float) -> float:
    """How many video tokens per head the probe attends to more than `factor` times the chunk's median
    token (importance [kv_heads, chunk_len]); the mean over heads. A chunk where nothing happens has
    few such tokens, one that shows something new has them where it shows it."""
    video = importance[:, ~protected.to(importance.device)]
    median = video.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(video.dtype).tiny)
    return float((video > factor * median).sum(dim=1).float().mean())


def kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Bool [kv_heads, chunk_len] with equal counts per head -> sorted indices [kv_heads, k]."""
    return keep.nonzero()[:, 1].view(keep.shape[0], -1)
