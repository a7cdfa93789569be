"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL driven layer by layer: chunked video prefill into a KV memory, then questions.

The model's own modules do all the maths (vision tower, embeddings, rotary tables, decoder
layers, final norm, LM head); this file only decides what each forward sees. Positions come
from streamer.engine.positions, never from the cache length, and each decoder layer attends over its
own memory through streamer.engine.attention, so layers may hold different numbers of tokens.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from memory.policy import ChunkContext, MemoryPolicy
from memory.store import ChunkRecord, KVMemory
from streamer.config import Config
from streamer.engine.attention import run_layer
from streamer.engine.compaction import compact
from streamer.engine.decode import EagerDecoder, StaticDecoder
from streamer.engine.generation import Answer, Generation, advance
from streamer.engine.models import BUILTIN_MODELS, RANDOM_MODELS, LoadedModel, family_of, load_model
from streamer.engine.positions import as_position_ids, text_positions, video_positions
from streamer.engine.probing import ChunkProbes
from streamer.engine.recall import recall
from streamer.engine.static_batch import StaticBatch
from streamer.engine.together import fiber_forward, fiber_waited
from streamer.engine.prompt import SYSTEM_PROMPT, VISION_END, chat_layout, pair_opening, pair_seconds
from streamer.engine.view import MemoryView
from streamer.engine.vision import encode_pairs
from video_io.preprocess import VideoPatches, VisionPreset, preprocess_frames

log = logging.getLogger("streamer")
# a stream's frame rate when its caller states none: qwen-vl-utils' default sampling rate
DEFAULT_FPS = 2.0
# the stages that add up to a chunk's time in Runner.ingest's timings (a policy's own, e.g. probe and search, are
# parts of `policy`; `read`, the wait for frames, is added by the chunk loop; `waited`, in a chunk ingested together
# with other sessions', is the part of them it spent waiting for theirs: streamer.engine.together)
CHUNK_STAGES = ("preprocess", "vision", "prefill", "policy")
# positions kept free after a stream's video for a question and its answer, at most (an eighth of a smaller
# limit: a question past it still works, only further from what the model was trained on); docs/DESIGN.md section 4
POSITION_RESERVE = 512


class PositionLimitError(ValueError):
    """A chunk whose positions would pass what the model was trained on (max_position_embeddings)."""


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
                 cuda_graphs: bool = True, repetition_penalty: float | None = None):
        """preset: frame resolution; default the checkpoint's own, else its family's processor defaults.
        cuda_graphs: on a GPU, answer from static buffers replayed as CUDA graphs (streamer.engine.decode; answers
        stepped together: streamer.engine.static_batch).
        repetition_penalty: default the checkpoint's generation_config.json's, else 1.0 (none)."""
        self.model = loaded.model
        self.model_name = loaded.name  # a built-in name or an absolute path
        self.tokenizer = loaded.tokenizer
        self.family = family_of(self.model)
        self.vision_shape = self.family.vision(self.model.config.vision_config)
        self.preset = preset or loaded.preset or self.family.preset
        self.language_model = self.model.model.language_model
        self.visual = self.model.model.visual
        text = self.model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.hidden_size = text.hidden_size
        # Qwen3-VL states head_dim (128, wider than hidden / heads in its 4B); the others derive it
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        vision = self.model.config.vision_config
        if (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) != (
                self.preset.patch_size, self.preset.temporal_patch_size, self.preset.merge_size):
            raise ValueError("the vision preset's patch sizes do not match the model's vision config")
        self.layout = chat_layout(self.tokenizer, system_prompt, timestamps=self.family.timestamps)
        self.prefix_ids = self.encode(self.layout.prefix)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.static_decoder = StaticDecoder(self) if graphs else None  # answers one at a time
        self.static_batch = StaticBatch(self) if graphs else None  # answers stepped together (packed=True)
        # what transformers' generate() would take from the checkpoint: its eos ids and repetition penalty
        # (its sampling settings do not apply: answers are greedy, which top_k = 1 in the releases is too)
        generation = loaded.generation
        eos = generation.eos_token_id if generation is not None else None
        if eos is None:
            eos = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.stop_ids = set(eos) if isinstance(eos, list) else {eos}
        if repetition_penalty is None:
            repetition_penalty = (generation.repetition_penalty if generation is not None else None) or 1.0
        if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        self.repetition_penalty = float(repetition_penalty)
        # called after every decoder layer of an eager forward: the service's executor runs other sessions'
        # answer steps there, so a long chunk prefill or probe search never holds them up for its whole length
        self.between_layers: Callable[[], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def position_limit(self, memory: KVMemory) -> int:
        """Where a stream's video must end: the model's max_position_embeddings, or the memory's max_positions if
        lower, less the room kept for a question (POSITION_RESERVE, or an eighth of a smaller limit)."""
        limit = min(self.model.config.text_config.max_position_embeddings, memory.max_positions or math.inf)
        return limit - min(POSITION_RESERVE, limit // 8)

    def pair_step(self, fps: float) -> float:
        """Temporal M-RoPE positions per frame pair at `fps` (the family's rule: Family.pair_step)."""
        return self.family.pair_step(self.model.config.vision_config, fps)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def new_memory(self, budget: int | None = None, age_power: float = 1.0,
                   max_positions: int | None = None, recall: int = 0, host_budget: int | None = None,
                   tier_growth: float = 0.0, focus: int = 0) -> KVMemory:
        """An empty memory; `budget` caps the tokens per layer on average (None: unbounded), `age_power` how
        evictions weigh age (memory.store), `max_positions` the positions a stream may span (None: the model's),
        `recall` the evicted tokens per layer on average a question may bring back from the host (0: none kept;
        streamer/engine/recall.py), `host_budget` how many per layer the host may keep (None: all), `tier_growth`
        how fast the JS bound that compacts old chunks loosens with age (0: off; memory.store eviction_keys),
        `focus` the tokens per layer a question reads, of the chunks it attends to most (0: all of it)."""
        if max_positions is not None and max_positions < len(self.prefix_ids) + 2:
            raise ValueError(f"max_positions {max_positions} leaves no room for a stream: give at least "
                             f"{len(self.prefix_ids) + 2} (0 or none: the model's own)")
        return KVMemory.empty(self.num_layers, self.kv_heads, self.head_dim, self.device, self.model.dtype, budget,
                              age_power, max_positions, recall, host_budget, tier_growth, focus)

    # --- forwards -------------------------------------------------------------------------

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.language_model.embed_tokens(torch.tensor([list(ids)], device=self.device))

    def encode_video(self, patches: VideoPatches) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Vision tower on one chunk of frames -> [tokens, hidden] and Qwen3-VL's DeepStack features (exact
        per chunk: the tower never crosses frame pairs), the pairs batched into one attention call per layer."""
        pixels = patches.pixel_values.to(self.device, self.visual.dtype)
        return encode_pairs(self.visual, self.vision_shape, pixels, patches.grid_thw)

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, view: MemoryView,
                       layers: range | None = None, layer_inputs: list | None = None,
                       deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
                       **attention_kwargs) -> torch.Tensor:
        """Run decoder layers on hidden [1, n, hidden] at absolute positions [n, 3], attending to `view`.

        layer_inputs, if given, collects the hidden state entering each layer run; deepstack, Qwen3-VL's
        (video token indices [k], features [k, hidden] per layer), is added at those tokens after layers
        0, 1, ... as the stock text model adds it; attention_kwargs (key_masks, attention_recorder) reach
        streamer.engine.attention through the layers.
        """
        rotary = self.language_model.rotary_emb(hidden, as_position_ids(positions, self.device))
        index, features = deepstack if deepstack is not None else (None, [])
        for idx in layers if layers is not None else range(self.num_layers):
            if layer_inputs is not None:
                layer_inputs.append(hidden)
            hidden = run_layer(self.language_model.layers[idx], hidden, view, attention_mask=None,
                               position_embeddings=rotary, **attention_kwargs)
            if idx < len(features):
                hidden = hidden.index_add(1, index, features[idx].unsqueeze(0).to(hidden.dtype))
            if self.between_layers is not None:
                self.between_layers()
        return hidden

    @torch.inference_mode()
    def check_step(self) -> None:
        """One token through every layer and the LM head, on an empty memory: what readiness checks run."""
        view = MemoryView(self.new_memory().context(), extra=1)
        logits = self.logits(self.forward_layers(self.embed_tokens(self.prefix_ids[:1]), text_positions(0, 1), view))
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model's logits are not finite")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, in float32 (log-probabilities in bf16 are too coarse)."""
        return self.model.lm_head(self.language_model.norm(hidden)).float()

    # --- video in -------------------------------------------------------------------------

    @torch.inference_mode()
    def ingest(self, memory: KVMemory, frames: Sequence[np.ndarray], policy: MemoryPolicy,
               preset: VisionPreset | None = None, fps: float | None = None) -> ChunkRecord:
        """Prefill one chunk of frames against the memory, let the policy prune it, commit it.

        The first chunk of a stream also carries the prompt prefix (the system turn, and <|vision_start|> but in
        Qwen3-VL, whose frame pairs bring their own). An odd number of frames is padded with the last frame (the tower encodes frame
        pairs). `preset` overrides the runner's frame resolution for this stream. `fps`: the rate the frames
        were sampled at, fixed by the stream's first chunk (default DEFAULT_FPS). Returns the chunk's report.
        """
        preset = preset or self.preset
        fps = fps if fps is not None else memory.fps or DEFAULT_FPS
        memory.check_fps(fps)
        timer = Timer(self.device)
        with timer:
            patches = preprocess_frames(frames, preset)
        preprocess_s = timer.seconds
        grid_t, grid_h, grid_w = patches.grid_thw
        memory.check_grid((grid_h, grid_w))
        with timer:
            video, deepstack = self.encode_video(patches)
        vision_s = timer.seconds

        def layout(stream: KVMemory):
            return self.chunk_layout(stream, len(frames), grid_t, grid_h // preset.merge_size,
                                     grid_w // preset.merge_size, fps)

        ids, positions, video_start = layout(memory)
        if memory.position_after(positions) > self.position_limit(memory):
            # re-time the past onto fewer positions (streamer/engine/compaction.py) in a fork, lay the chunk out
            # again, and keep the re-timed memory only if the chunk then fits
            retimed = memory.fork()
            compact(self.language_model.rotary_emb, retimed, self.position_limit(memory),
                    moves_all=self.family.timestamps)
            ids, positions, video_start = layout(retimed)
            self.check_positions(retimed, positions, len(frames))
            memory.layers, memory.host = retimed.layers, retimed.host
            memory.next_position, memory.time_shift = retimed.next_position, retimed.time_shift
        is_video = torch.tensor(ids) == self.model.config.video_token_id
        hidden = self.embed_tokens(ids)
        index = is_video.nonzero()[:, 0].to(self.device)
        hidden[0, index] = video.to(hidden.dtype)
        protected = ~is_video  # prompt text, and in Qwen3-VL each frame pair's time and vision tokens

        chunk_len = positions.shape[0]
        view = MemoryView(memory.context(), extra=chunk_len)
        with timer:
            self.forward_layers(hidden, positions, view, deepstack=(index, deepstack))
        prefill_s = timer.seconds
        with timer:
            model = ChunkProbes(self, view, chunk_len, memory.position_after(positions), memory.probe_drafts)
            selection = policy.select(ChunkContext(memory, positions, protected, model))
            new_kv = [view.new_tokens(layer, chunk_len) for layer in range(self.num_layers)]
            record = memory.commit(new_kv, positions, protected, selection.kept, selection.scores,
                                   frames=len(frames), grid_thw=patches.grid_thw, fps=fps, video_start=video_start,
                                   chosen=selection.report, forget_before=selection.forget_before,
                                   levels=selection.levels)
        if model.probed:
            memory.probe_drafts = model.probed
            record.chosen["probe_tokens"] = dict(answer=model.answer_tokens, drafted=model.drafted_tokens)
        record.timings = dict(preprocess=preprocess_s, vision=vision_s, prefill=prefill_s, policy=timer.seconds,
                              **selection.timings)
        if waited := fiber_waited():  # ingested together with other sessions' chunks: the stages count this wait
            record.timings["waited"] = waited
        return record

    def check_positions(self, memory: KVMemory, positions: torch.Tensor, frames: int) -> None:
        """Refuse a chunk that would take the stream past the model's positions: RoPE computes any position,
        but past max_position_embeddings the model reads distances it never saw and its answers degrade with
        no error (docs/DESIGN.md section 4)."""
        limit = self.position_limit(memory)
        if memory.position_after(positions) > limit:
            seconds = f" ({memory.frames / memory.fps / 3600:.2f} h at {memory.fps:g} fps)" if memory.fps else ""
            raise PositionLimitError(
                f"the stream is full: {memory.frames} frames{seconds} have taken it to position "
                f"{memory.next_position}, and {frames} more would pass position {limit}, where its video must end "
                f"(max_position_embeddings or memory.max_positions, less room for a question) even "
                "with its past re-timed; questions still work on the memory as it is; for more video raise "
                "max_positions, lower chunk_frames, or start a new stream")

    def chunk_layout(self, memory: KVMemory, frames: int, pairs: int, merged_h: int, merged_w: int,
                     fps: float) -> tuple[list[int], torch.Tensor, int]:
        """A chunk's token ids (video tokens as <|video_pad|>), their positions [n, 3] and where the stream's
        video starts (docs/DESIGN.md section 4), as one prompt of the whole video would lay them out: the
        prefix first if the stream has none yet; then in Qwen2-VL and Qwen2.5-VL the pairs' tokens, in the
        stream's one open vision block, and in Qwen3-VL each pair as a block of its own between its time
        and vision tokens."""
        video_token = self.model.config.video_token_id
        first = memory.video_start is None
        ids = list(self.prefix_ids) if first else []
        video_start = memory.next_position + len(ids) if first else memory.video_start
        if not self.family.timestamps:
            video = video_positions(video_start, memory.temporal_groups, pairs, merged_h, merged_w, self.pair_step(fps))
            video[:, 0] -= memory.time_shift  # the stream's re-timed past moved its newest pairs back this far
            positions = torch.cat([text_positions(memory.next_position, len(ids)), video])
            return ids + [video_token] * (pairs * merged_h * merged_w), positions, video_start
        parts = [text_positions(memory.next_position, len(ids))]
        cursor = memory.next_position + len(ids)
        for seconds in pair_seconds(memory.frames, frames, fps, self.model.config.vision_config.temporal_patch_size):
            opening = self.encode(pair_opening(seconds))
            block = video_positions(cursor + len(opening), 0, 1, merged_h, merged_w)
            end = int(block.max()) + 1
            ids += opening + [video_token] * (merged_h * merged_w) + self.encode(VISION_END)
            parts += [text_positions(cursor, len(opening)), block, text_positions(end, 1)]
            cursor = end + 1
        return ids, torch.cat(parts), video_start

    # --- questions out ----------------------------------------------------------------------

    def decoder(self, question_tokens: int) -> EagerDecoder | StaticDecoder:
        """The CUDA-graph decoder where there is one and the question fits its buckets, else eager forwards; in a
        chunk ingested together with others (streamer.engine.together), eager forwards packed with theirs."""
        hand_off = fiber_forward()
        if hand_off is not None:
            return EagerDecoder(self, run=hand_off)  # packed with other sessions' forwards: the static decoder runs one
        if self.static_decoder is not None and self.static_decoder.fits(question_tokens):
            return self.static_decoder
        return EagerDecoder(self)

    def suffix_ids(self, question: str) -> list[int]:
        """The tokens after the video: the end of the user turn with `question`, and the answer's start."""
        return self.encode(self.layout.question_suffix(question))

    def _question_ids(self, memory: KVMemory, question: str) -> list[int]:
        if memory.video_start is None:
            raise ValueError("the memory holds no video yet: ingest at least one chunk of frames first")
        return self.suffix_ids(question)

    def prompt_ids(self, memory: KVMemory, question_ids: list[int]) -> set[int]:
        """The token ids of the prompt as transformers' generate() sees it, which its repetition penalty
        counts: the prefix, the video tokens (in Qwen3-VL each pair's time and vision tokens too), the question."""
        seen = {*self.prefix_ids, self.model.config.video_token_id, *question_ids}
        if self.family.timestamps:
            first = 0
            for frames in memory.history["frames"]:
                for seconds in pair_seconds(first, frames, memory.fps,
                                            self.model.config.vision_config.temporal_patch_size):
                    seen.update(self.encode(pair_opening(seconds)))
                first += frames
            seen.update(self.encode(VISION_END))
        return seen

    def choose(self, logits: torch.Tensor, seen: set[int]) -> int:
        """Greedy choice after transformers' repetition penalty over every token id of the prompt and
        the answer so far (positive logits divided by the penalty, negative ones multiplied)."""
        if self.repetition_penalty != 1.0:
            index = torch.tensor(sorted(seen), device=logits.device)
            score = logits[index]
            logits = logits.index_put((index,), torch.where(score < 0, score * self.repetition_penalty,
                                                            score / self.repetition_penalty))
        return int(logits.argmax())

    def begin(self, memory: KVMemory, question: str, max_new_tokens: int = 64,
              on_text: Callable[[str], None] | None = None, stop_at_end: bool = True,
              packed: bool = False) -> Generation:
        """A greedy answer to `question` against the memory, ready for its first step (streamer.engine.generation.
        advance); the memory itself is never changed. on_text, if given, receives the answer's text piece by
        piece as tokens are generated. stop_at_end=False generates exactly max_new_tokens (timing decode
        steps). packed=True: the answer may share steps with others (never the static decoder's buffers)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()  # its time to the first token counts the recall too
        ids = self._question_ids(memory, question)
        memory = recall(self, memory, ids)  # with evicted tokens on the host: the chunks the question reads, back
        seen = self.prompt_ids(memory, ids) if self.repetition_penalty != 1.0 else set()
        generation = Generation(position=memory.next_position, inputs=ids, max_new_tokens=max_new_tokens,
                                stop_at_end=stop_at_end, seen=seen, on_text=on_text, created=started)
        decoder = None if packed else self.decoder(len(ids))
        if isinstance(decoder, StaticDecoder):
            generation.static, generation.context = decoder, memory.context()
        elif packed and self.static_batch is not None:
            generation.batch, generation.context = self.static_batch, memory.context()
        else:
            generation.view = MemoryView(memory.context(), extra=len(ids) + max_new_tokens)
        return generation

    def answer(self, memory: KVMemory, question: str, max_new_tokens: int = 64,
               on_text: Callable[[str], None] | None = None, stop_at_end: bool = True) -> Answer:
        """Greedy answer to `question` against the memory, alone (Runner.begin, then steps until it is done)."""
        generation = self.begin(memory, question, max_new_tokens, on_text, stop_at_end)
        while not generation.done:
            advance(self, [generation])
        return generation.answer(self.tokenizer)


def load_runner(config: Config, device: str | None = None) -> tuple[Runner, float]:
    """The configured model (on `device` if given, else the configured one) and a runner at the
    configured frame resolution; returns (runner, seconds spent loading)."""
    started = time.perf_counter()
    log.info("loading model %s", config.model.name)
    loaded = load_model(config.model.name, device=device or config.model.device, dtype=config.model.dtype)
    seconds = time.perf_counter() - started
    log.info("model on %s (%s), loaded in %.1f s", loaded.device, loaded.dtype, seconds)
    preset = config.vision_preset(loaded.preset or family_of(loaded.model).preset)
    runner = Runner(loaded, preset, cuda_graphs=config.model.cuda_graphs,
                    repetition_penalty=config.generation.repetition_penalty)
    if loaded.name in RANDOM_MODELS:
        log.warning("model %s has RANDOM WEIGHTS: its answers are noise, good for exactness and speed "
                    "measurements only; give --model a checkpoint directory (or builtin) for real answers",
                    loaded.name)
    if runner.layout.source != "chat template" and loaded.name not in BUILTIN_MODELS:
        log.warning("the checkpoint's tokenizer has no chat template: prompts use the built-in Instruct layout")
    return runner, seconds
