"""The language model as the decoders, the probes and the generations see it: a typed seam.

streamer.engine.runner.Runner implements it; decode.py, generation.py and probing.py take a
TextModel and use nothing else of the runner, so what they may call is written down here, not
found by reading them (and a test double needs only this).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch


class TextModel(Protocol):
    tokenizer: object  # a transformers tokenizer: encode and decode
    stop_ids: set[int]  # token ids that end an answer
    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    model: torch.nn.Module  # the whole checkpoint (its dtype sizes static buffers)
    language_model: torch.nn.Module  # its decoder stack: embed_tokens, layers, rotary_emb, norm
    between_layers: Callable[[], None] | None  # called after every layer of forward_layers (the executor's hook)
    static_batch: object | None  # streamer.engine.static_batch.StaticBatch: answers' seats on a GPU (None: packed)

    @property
    def device(self) -> torch.device: ...

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """[1, n, hidden] embeddings of token ids."""

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, view, layers: range | None = None,
                       layer_inputs: list | None = None, deepstack=None, **attention_kwargs) -> torch.Tensor:
        """Decoder layers over hidden [1, n, hidden] at positions [n, 3], reading and extending the cache `view`."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, float32."""

    def choose(self, logits: torch.Tensor, seen: set[int]) -> int:
        """The greedy next token (after the repetition penalty over `seen`)."""

    def suffix_ids(self, question: str) -> list[int]:
        """The tokens after the video: the end of the user turn with `question`, and the answer's start."""

    def decoder(self, question_tokens: int):
        """The decoder (streamer.engine.decode) for a forward of this many tokens: the static one (CUDA
        graphs) where there is one and it fits, else an eager one."""
