"""Qwen2-VL driven layer by layer: chunked video prefill into a KV memory, then questions.

The model's own modules do all the maths (vision tower, embeddings, rotary tables, decoder
layers, final norm, LM head); this file only decides what each forward sees. Positions come
from streamer.positions, never from the cache length, and each decoder layer attends over its
own memory through streamer.attention, so layers may hold different numbers of tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from memory.policies import ChunkContext, MemoryPolicy
from memory.store import KVMemory, MemoryView, commit_chunk
from streamer.models import LoadedModel
from streamer.decode import EagerDecoder, StaticDecoder
from streamer.positions import as_position_ids, text_positions, video_positions
from streamer.prompt import SYSTEM_PROMPT, question_suffix, video_prefix
from streamer.vision import encode_pairs
from video_io.preprocess import VideoPatches, VisionPreset, preprocess_frames

TOP_LOGPROBS = 5


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    first_token_logprobs: list[dict]  # top-5 of the first answer step: {"token", "id", "logprob"}
    timings: dict = field(default_factory=dict)


class Timer:
    """Wall-clock seconds of a block, synchronising the GPU so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Runner:
    def __init__(self, loaded: LoadedModel, preset: VisionPreset | None = None, system_prompt: str = SYSTEM_PROMPT,
                 cuda_graphs: bool = True):
        """preset: frame resolution; default the model's own (builtin), else the processor's defaults.
        cuda_graphs: on a GPU, answer from static buffers replayed as CUDA graphs (streamer.decode)."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.preset = preset or loaded.preset or VisionPreset()
        self.language_model = self.model.model.language_model
        self.visual = self.model.model.visual
        text = self.model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.hidden_size = text.hidden_size
        self.head_dim = text.hidden_size // text.num_attention_heads
        vision = self.model.config.vision_config
        if (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) != (
                self.preset.patch_size, self.preset.temporal_patch_size, self.preset.merge_size):
            raise ValueError("the vision preset's patch sizes do not match the model's vision config")
        self.prefix_ids = self.encode(video_prefix(system_prompt))
        self.static_decoder = StaticDecoder(self) if cuda_graphs and self.device.type == "cuda" else None
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def new_memory(self, budget: int | None = None) -> KVMemory:
        """An empty memory; `budget` caps the tokens each layer may hold (None: unbounded)."""
        return KVMemory.empty(self.num_layers, self.kv_heads, self.head_dim, self.device, self.model.dtype, budget)

    # --- forwards -------------------------------------------------------------------------

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.language_model.embed_tokens(torch.tensor([list(ids)], device=self.device))

    def encode_video(self, patches: VideoPatches) -> torch.Tensor:
        """Vision tower on one chunk of frames -> [tokens, hidden] (exact per chunk: its attention
        never crosses frame pairs), the pairs batched into one attention call per layer."""
        pixels = patches.pixel_values.to(self.device, self.visual.dtype)
        return encode_pairs(self.visual, pixels, patches.grid_thw)

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, view: MemoryView,
                       layers: range | None = None, layer_inputs: list | None = None,
                       **attention_kwargs) -> torch.Tensor:
        """Run decoder layers on hidden [1, n, hidden] at absolute positions [n, 3], attending to `view`.

        layer_inputs, if given, collects the hidden state entering each layer run; attention_kwargs
        (key_masks, attention_recorder) reach streamer.attention through the layers.
        """
        rotary = self.language_model.rotary_emb(hidden, as_position_ids(positions, self.device))
        for idx in layers if layers is not None else range(self.num_layers):
            if layer_inputs is not None:
                layer_inputs.append(hidden)
            hidden = self.language_model.layers[idx](
                hidden, attention_mask=None, past_key_values=view, use_cache=True, position_embeddings=rotary,
                **attention_kwargs,
            )
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, in float32 (log-probabilities in bf16 are too coarse)."""
        return self.model.lm_head(self.language_model.norm(hidden)).float()

    # --- video in -------------------------------------------------------------------------

    @torch.inference_mode()
    def ingest(self, memory: KVMemory, frames: Sequence[np.ndarray], policy: MemoryPolicy,
               preset: VisionPreset | None = None) -> dict:
        """Prefill one chunk of frames against the memory, let the policy prune it, commit it.

        The first chunk of a stream also carries the prompt prefix (system turn and <|vision_start|>).
        An odd number of frames is padded with the last frame (Qwen2-VL encodes frame pairs).
        `preset` overrides the runner's frame resolution for this stream. Returns the chunk's report.
        """
        preset = preset or self.preset
        timer = Timer(self.device)
        with timer:
            patches = preprocess_frames(frames, preset)
        preprocess_s = timer.seconds
        grid_t, grid_h, grid_w = patches.grid_thw
        if memory.grid_hw is None:
            memory.grid_hw = (grid_h, grid_w)
        elif memory.grid_hw != (grid_h, grid_w):
            raise ValueError(
                f"frame size changed mid-stream: patch grid {(grid_h, grid_w)} after {memory.grid_hw}; "
                "every frame of a stream must have the same size"
            )
        with timer:
            video = self.encode_video(patches).unsqueeze(0)
        vision_s = timer.seconds

        merge = preset.merge_size
        if memory.video_start is None:
            prefix = self.embed_tokens(self.prefix_ids)
            prefix_positions = text_positions(memory.next_position, len(self.prefix_ids))
            memory.video_start = memory.next_position + len(self.prefix_ids)
        else:
            prefix = video[:, :0]
            prefix_positions = text_positions(0, 0)
        positions = torch.cat([prefix_positions, video_positions(
            memory.video_start, memory.temporal_groups, grid_t, grid_h // merge, grid_w // merge)])
        hidden = torch.cat([prefix.to(video.dtype), video], dim=1)
        protected = torch.zeros(positions.shape[0], dtype=torch.bool)
        protected[:prefix.shape[1]] = True

        view = MemoryView(memory.context(), extra=positions.shape[0])
        with timer:
            self.forward_layers(hidden, positions, view)
        prefill_s = timer.seconds
        next_position = max(memory.next_position, int(positions.max()) + 1)
        with timer:
            selection = policy.select(ChunkContext(memory, view, positions, protected, next_position, runner=self))
            evicted = commit_chunk(memory, view, positions, protected, selection.kept, selection.scores)
        policy_s = timer.seconds

        memory.next_position = next_position
        memory.temporal_groups += grid_t
        memory.frames += len(frames)
        memory.full_tokens += positions.shape[0]
        chunk_len = positions.shape[0]
        kept = [chunk_len] * self.num_layers if selection.kept is None else [k.shape[1] for k in selection.kept]
        report = dict(frames=len(frames), tokens=chunk_len, **selection.report, kept=kept, evicted=evicted,
                      memory_tokens=memory.mean_tokens(),
                      timings=dict(preprocess=preprocess_s, vision=vision_s, prefill=prefill_s, policy=policy_s,
                                   **selection.timings))
        memory.chunks.append(report)
        return report

    # --- questions out ----------------------------------------------------------------------

    @torch.inference_mode()
    def question_logits(self, memory: KVMemory, question: str) -> torch.Tensor:
        """Float32 logits at every position of the question suffix: [suffix_len, vocab]."""
        ids = self._question_ids(memory, question)
        view = MemoryView(memory.context(), extra=len(ids))
        hidden = self.forward_layers(self.embed_tokens(ids), text_positions(memory.next_position, len(ids)), view)
        return self.logits(hidden)[0]

    def decoder(self, question_tokens: int) -> EagerDecoder | StaticDecoder:
        """The CUDA-graph decoder where there is one and the question fits its buckets, else eager forwards."""
        if self.static_decoder is not None and self.static_decoder.fits(question_tokens):
            return self.static_decoder
        return EagerDecoder(self)

    def _question_ids(self, memory: KVMemory, question: str) -> list[int]:
        if memory.video_start is None:
            raise ValueError("the memory holds no video yet: ingest at least one chunk of frames first")
        return self.encode(question_suffix(question))

    @torch.inference_mode()
    def answer(self, memory: KVMemory, question: str, max_new_tokens: int = 64,
               on_text: Callable[[str], None] | None = None, stop_at_end: bool = True) -> Answer:
        """Greedy answer to `question` against the memory; the memory itself is left unchanged.

        on_text, if given, receives the answer's text piece by piece as tokens are generated
        (pieces are whole characters: a token ending inside a UTF-8 sequence waits for the next).
        stop_at_end=False generates exactly max_new_tokens (for timing decode steps).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        timer = Timer(self.device)
        with timer:
            ids = self._question_ids(memory, question)
            decoder = self.decoder(len(ids))
            logits = decoder.start(memory.context(), memory.next_position, ids, max_new_tokens)
        ttft = timer.seconds
        logprobs = torch.log_softmax(logits, dim=-1).topk(TOP_LOGPROBS)
        first = [dict(token=self.tokenizer.decode([i]), id=i, logprob=lp)
                 for lp, i in zip(logprobs.values.tolist(), logprobs.indices.tolist())]

        tokens: list[int] = []
        steps = 0
        sent = ""
        with timer:
            token = int(logits.argmax())
            while not (stop_at_end and token in self.stop_ids):
                tokens.append(token)
                if on_text is not None:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    if not text.endswith("\ufffd") and len(text) > len(sent):
                        on_text(text[len(sent):])
                        sent = text
                if len(tokens) == max_new_tokens:
                    break
                steps += 1
                token = int(decoder.step(token).argmax())
        decode_s = timer.seconds
        timings = dict(question_prefill=ttft, decode=decode_s,
                       decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else None)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(text) > len(sent):
            on_text(text[len(sent):])
        return Answer(text=text, token_ids=tokens, first_token_logprobs=first, timings=timings)
