"""Train the built-in model: a small Qwen2VLForConditionalGeneration on procedural videos.

    python -m streamer.builtin.train --config configs/train/builtin.toml --out streamer/assets/builtin

The forward is the stock transformers one over the layout the runner serves, with the
project's absolute M-RoPE positions (as tests/reference.py builds them for one video):

    prefix  <|video_pad|> x N  [suffix(q1) answer1 <|im_end|>] [suffix(q2) answer2 <|im_end|>] ...

Several questions share one pass over a video: each question block sees the prefix, the video
and itself only (a 4-D attention mask) and starts at the same position, so every block is
exactly the sequence the runner builds for that question, at the price of one video forward.
The loss is on the answer tokens and <|im_end|>, averaged per question so that the long
`describe` answers weigh as much as a one-word answer. Lengths follow a curriculum: short videos
first (the vision tower and the question logic are learnt cheaply), then up to 384 frames. A
stage with `max_frames = 0` is text-only: the prefix, no video, then questions that need none
(`pick`), many per step for the price of a few video tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from streamer.engine.models import PRESET_FILE, special_token_ids, resolve_device, tiny_tokenizer
from streamer.engine.positions import text_positions, video_positions
from streamer.engine.prompt import SYSTEM_PROMPT, question_suffix, video_prefix
from streamer.builtin.videos import (ANSWER_WORDS, ASK, BUILTIN_PRESET, CHOICE_BASES, COLOURS, DURATIONS, GRID,
                                     MAX_EVENTS, MAX_REPEATS, OPTIONS, QA, SHAPES, TEXT_KINDS, TRAIN_KINDS,
                                     SyntheticVideo, make_video)
from video_io.preprocess import preprocess_frames

TRAIN_SEEDS = 10**6  # training videos use seeds from here up; evaluation uses seeds below it
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "builtin.toml"


@dataclass
class ModelConfig:
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])  # sums to head_dim / 2
    rope_theta: float = 10000.0
    vision_depth: int = 2
    vision_dim: int = 64
    vision_heads: int = 2


@dataclass
class Stage:
    min_frames: int  # each batch draws one even length in [min_frames, max_frames]; 0 and 0: text only
    max_frames: int
    steps: int
    batch: int  # videos (or text-only samples) per step
    questions: list[str] = field(default_factory=list)  # packed after each sample; empty: the config's
    # text-only samples (four TEXT_KINDS questions each) added to each batch of a video stage, so that a hop
    # a text-only stage taught is still practised while the videos' questions train the same weights
    text: int = 0

    def __post_init__(self):
        if unknown := set(self.questions) - set(TRAIN_KINDS):
            raise ValueError(f"stage questions {sorted(unknown)}: not families of {TRAIN_KINDS}")
        if self.max_frames == 0 and not (self.questions and set(self.questions) <= set(TEXT_KINDS)):
            raise ValueError(f"a text-only stage (max_frames = 0) needs its own `questions`, of the families "
                             f"that need no video: {TEXT_KINDS}")
        if self.text and self.max_frames == 0:
            raise ValueError("`text` adds text-only samples to a video stage; a text-only stage sets `batch`")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[Stage] = field(default_factory=lambda: [Stage(16, 48, 200, 12)])
    lr: float = 3e-3
    final_lr: float = 1e-4  # cosine decay to this over all steps
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    probe_weight: float = 1.0  # training-only heads on the video tokens (Probes; 0: none)
    # share of questions that see the video pruned: the tokens showing an object and a random 2-30% of the
    # others, as a memory keeps them, so that a pruned memory reads as a video and not as none
    pruned: float = 0.0
    # questions packed after each video; repeats get different draws (more signal for the hard families)
    questions: list[str] = field(default_factory=lambda: list(TRAIN_KINDS))
    seed: int = 0
    # a model directory to start from (a fine-tune: its weights, the same [model]); "": from scratch
    init: str = ""
    threads: int = 1  # CPU threads (the machines here share 2 cores)
    device: str = "auto"  # auto: cuda when available
    log_every: int = 25

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        model = ModelConfig(**data.pop("model", {}))
        stages = [Stage(**stage) for stage in data.pop("stages", [])] or cls().stages
        return cls(model=model, stages=stages, **data)


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2VLForConditionalGeneration:
    text = dict(
        hidden_size=config.hidden, intermediate_size=config.intermediate, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.kv_heads, hidden_act="silu",
        # the positions its training reaches (384 frames: 15 prompt + 192 pair positions, then the question), rounded
        # up to a power of two: a longer stream is re-timed to stay within them (streamer/engine/compaction.py), which
        # measured +33 points on questions about the newest video of 1,536-frame streams (docs/MEMORY.md)
        max_position_embeddings=256, rms_norm_eps=1e-6, vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "mrope_section": config.mrope_section},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    vision = dict(
        depth=config.vision_depth, embed_dim=config.vision_dim, mlp_ratio=2, num_heads=config.vision_heads,
        in_channels=3, patch_size=BUILTIN_PRESET.patch_size, spatial_merge_size=BUILTIN_PRESET.merge_size,
        temporal_patch_size=BUILTIN_PRESET.temporal_patch_size, hidden_act="quick_gelu", hidden_size=config.hidden,
    )
    qwen = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **special_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(qwen, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    return model


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [3, B, L]
    mask: torch.Tensor  # [B, 1, L, L] bool: who may attend to whom
    pixels: torch.Tensor  # every video's patches, concatenated
    grids: torch.Tensor  # [B, 3]
    targets: torch.Tensor  # [B, L] next token to predict at each position, -100 where there is no loss
    weights: torch.Tensor  # [B, L] loss weight (1 / answer length of the question)
    kind: torch.Tensor  # [B, L] index in TRAIN_KINDS of the answer's question kind there, -1 elsewhere
    labels: torch.Tensor  # [video tokens, len(VIDEO_HEADS)] targets of the training probes (token_labels)
    mentions: torch.Tensor  # [B, L, len(QUESTION_HEADS)] targets of the question-side probes (mention_labels)

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


class Packer:
    """Videos + questions -> packed training sequences."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
        self.prefix = self.encode(video_prefix(SYSTEM_PROMPT))
        self.video_token = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.words = {self.encode(f" {word}")[0]: word for word in (*COLOURS, *SHAPES, "shape")}

    def sample(self, video: SyntheticVideo | None, questions: list[QA], pruned: float = 0.0,
               rng: np.random.Generator | None = None) -> dict:
        """The prefix, the video (None: a text-only sample), then a block per question; a share `pruned` of
        the blocks (drawn by `rng`) sees only some of the video (TrainConfig.pruned)."""
        ids, positions, after = list(self.prefix), [text_positions(0, len(self.prefix))], len(self.prefix)
        pixels, grid, labels = None, None, torch.zeros(0, len(VIDEO_HEADS), dtype=torch.long)
        if video is not None:
            patches = preprocess_frames(video.frames(), BUILTIN_PRESET)
            grid_t, grid_h, grid_w = patches.grid_thw
            merge = BUILTIN_PRESET.merge_size
            tokens = video_positions(len(self.prefix), 0, grid_t, grid_h // merge, grid_w // merge)
            ids += [self.video_token] * patches.num_tokens
            positions.append(tokens)
            after = int(tokens.max()) + 1
            pixels, grid, labels = patches.pixel_values, patches.grid_thw, token_labels(video)
        segment = [0] * len(ids)
        targets, weights = [-100] * len(ids), [0.0] * len(ids)
        kind = [-1] * len(ids)
        mentions = [(-100,) * len(QUESTION_HEADS)] * len(ids)
        hidden = []  # (first row, end row, video columns it cannot see) per pruned block
        shown = video.event_tokens().reshape(-1) if video is not None and pruned else None
        for k, qa in enumerate(questions, start=1):
            text = question_suffix(qa.question)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            question, answer = encoded.input_ids, self.encode(qa.answer) + [self.end]
            block = question + answer
            start = len(ids)
            if shown is not None and rng.random() < pruned:
                keep = shown | (rng.random(len(shown)) < rng.uniform(0.02, 0.3))
                hidden.append((start, start + len(block), len(self.prefix) + np.flatnonzero(~keep)))
            ids += block
            positions.append(text_positions(after, len(block)))
            segment += [k] * len(block)
            targets += [-100] * len(block)
            weights += [0.0] * len(block)
            kind += [-1] * len(block)
            answering = self.answer_labels(qa, text, encoded.offset_mapping)
            named = (mention_labels(video, [self.words.get(token) for token in block]) if video is not None
                     else [(-100,) * NAMED_HEADS] * len(block))
            mentions += [(*named[i], *answering.get(i, (-100,) * ANSWER_HEADS)) for i in range(len(block))]
            for j, token in enumerate(answer):  # the token before each answer token predicts it
                targets[start + len(question) - 1 + j] = token
                weights[start + len(question) - 1 + j] = 1.0 / len(answer)
                kind[start + len(question) - 1 + j] = TRAIN_KINDS.index(qa.kind)
        return dict(ids=ids, positions=torch.cat(positions), segment=segment, targets=targets, weights=weights,
                    kind=kind, pixels=pixels, grid=grid, labels=labels, mentions=mentions, hidden=hidden)

    def answer_labels(self, qa: QA, text: str, spans: list[tuple[int, int]]) -> dict[int, tuple[int, int, int]]:
        """Targets of the answer heads by token of the question block (`text`, its tokens' character `spans`):
        on each option's last word of a `choice` question, its letter's index and whether it is the right
        one; on the last token of the question a family asks (alone, or inside a `choice` prompt), its answer in ANSWER_WORDS. The three
        hops from the question to the letter answered: without the first two heads the letter stayed at
        chance for 500 steps of the fine-tune, and without the third whether an option is right stayed at
        chance for 350 steps (configs/train/builtin_tune.toml)."""
        ending = lambda part: max(i for i, (start, _) in enumerate(spans) if start < text.index(part) + len(part))
        labels = {}
        asked, answer = (qa.asked, qa.options[ord(qa.answer) - 65]) if qa.options else (qa.question, qa.answer)
        if qa.options or qa.kind in CHOICE_BASES:
            labels[ending(asked)] = (-100, -100, ANSWER_WORDS.index(answer))
        for k, option in enumerate(qa.options):
            labels[ending(f"{chr(65 + k)}. {option}")] = (k, int(chr(65 + k) == qa.answer), -100)
        return labels

    def batch(self, samples: list[dict]) -> Batch:
        length = max(len(s["ids"]) for s in samples)
        n = len(samples)
        ids = torch.full((n, length), self.pad)
        positions = torch.zeros(3, n, length, dtype=torch.long)
        segment = torch.full((n, length), -1)
        targets = torch.full((n, length), -100)
        weights = torch.zeros(n, length)
        kind = torch.full((n, length), -1)
        mentions = torch.full((n, length, len(QUESTION_HEADS)), -100)
        for b, s in enumerate(samples):
            size = len(s["ids"])
            ids[b, :size] = torch.tensor(s["ids"])
            positions[:, b, :size] = s["positions"].t()
            segment[b, :size] = torch.tensor(s["segment"])
            targets[b, :size] = torch.tensor(s["targets"])
            weights[b, :size] = torch.tensor(s["weights"])
            kind[b, :size] = torch.tensor(s["kind"])
            mentions[b, :size] = torch.tensor(s["mentions"])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        # a query sees the shared context (segment 0) and its own block; padding (-1) sees padding
        visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        for b, s in enumerate(samples):
            for start, end, columns in s["hidden"]:
                visible[b, start:end, torch.from_numpy(columns)] = False
        videos = [s for s in samples if s["grid"] is not None]
        pixels = torch.cat([s["pixels"] for s in videos]) if videos else torch.zeros(0)
        return Batch(ids, positions, (visible & causal)[:, None], pixels,
                     torch.tensor([s["grid"] for s in videos], dtype=torch.long).view(-1, 3), targets, weights, kind,
                     torch.cat([s["labels"] for s in samples]), mentions)


def make_batch(packer: Packer, seed: int, step: int, stage: Stage,
               questions: tuple[str, ...] = TRAIN_KINDS, pruned: float = 0.0) -> Batch:
    """Deterministic in (seed, step): the length and the videos of this step, or its text-only samples."""
    rng = np.random.default_rng([seed, step])
    questions = tuple(stage.questions) or questions
    if stage.max_frames == 0:
        return packer.batch([packer.sample(None, [ASK[family](None, own) for family in questions])
                             for own in rng.spawn(stage.batch)])
    frames = 2 * int(rng.integers(stage.min_frames // 2, stage.max_frames // 2 + 1))
    videos = [make_video(TRAIN_SEEDS + seed * 10**7 + step * stage.batch + i, frames) for i in range(stage.batch)]
    draws = np.random.default_rng([seed, step, 1])
    texts = [packer.sample(None, [ASK[TEXT_KINDS[k % len(TEXT_KINDS)]](None, own) for k in range(4)])
             for own in np.random.default_rng([seed, step, 2]).spawn(stage.text)]
    return packer.batch([packer.sample(video, video.questions(questions), pruned, draws) for video in videos] + texts)


# Training-only heads (Probes): (name, where they read, classes). "vision": the video tokens entering
# the LLM; "layer k": the output of layer k (the video tokens for VIDEO_HEADS, the question's words
# for QUESTION_HEADS). A question head reads one layer after the video feature it looks up.
VIDEO_HEADS = (("colour", "vision", 1 + len(COLOURS)), ("shape", "vision", 1 + len(SHAPES)),
               ("cell", "vision", GRID * GRID), ("events", 2, 1 + MAX_EVENTS), ("repeats", 2, 1 + MAX_REPEATS),
               ("run", 2, 1 + max(DURATIONS) // 2), ("companion", 2, 1 + len(COLOURS)))
QUESTION_HEADS = (("named_colour", 1, len(COLOURS)), ("named_count", 3, 1 + MAX_REPEATS),
                  ("named_event", 4, 1 + MAX_EVENTS), ("named_cell", 4, GRID * GRID),
                  ("named_duration", 4, len(DURATIONS)), ("named_companion", 4, 1 + len(COLOURS)),
                  ("option_letter", 2, OPTIONS), ("right_option", 7, 2), ("asked_answer", 5, len(ANSWER_WORDS)))
PROBE_HEADS = tuple(name for name, _, _ in (*VIDEO_HEADS, *QUESTION_HEADS))
NAMED_HEADS, ANSWER_HEADS = 6, 3  # QUESTION_HEADS on the words that name what to look up (mention_labels), then
                                  # on a choice's options and the question's end (Packer.answer_labels)


def token_labels(video: SyntheticVideo) -> torch.Tensor:
    """[video tokens, len(VIDEO_HEADS)] targets per token (frame pair, row, column), -100 where there is
    none: 1 + the colour and shape of the object shown there (0: none); the token's cell; the events
    started so far; on an event's tokens, the events of its colour so far, the pairs it has been shown
    so far, and 1 + the colour of the other event of its episode once that has appeared (0: alone)."""
    labels = torch.zeros(video.num_frames // 2, GRID * GRID, len(VIDEO_HEADS), dtype=torch.long)
    labels[:, :, 2] = torch.arange(GRID * GRID)
    for number, event in enumerate(video.events, start=1):
        shown = slice(event.pairs.start, event.pairs.stop)
        labels[event.pairs.start:, :, 3] = number
        labels[shown, event.cell, 0] = 1 + list(COLOURS).index(event.colour)
        labels[shown, event.cell, 1] = 1 + SHAPES.index(event.shape)
        labels[shown, event.cell, 4] = sum(e.colour == event.colour for e in video.events[:number])
        labels[shown, event.cell, 5] = torch.arange(1, len(event.pairs) + 1)
        other = video.companion(event)
        if other is not None:
            labels[shown, event.cell, 6] = 1 + list(COLOURS).index(other.colour)
            labels[event.pairs.start:other.pairs.start, event.cell, 6] = -100  # not seen yet
    return labels.flatten(0, 1)


def mention_labels(video: SyntheticVideo, words: list[str | None]) -> list[tuple[int, ...]]:
    """Per question token, targets of the named_* QUESTION_HEADS (-100: none). Where a "{colour} {shape}"
    ends: the colour (copied from the word before), and of the event it names the number (0 if none),
    cell, duration and 1 + the colour shown with it (0: alone). On the colour of a "{colour} shape": how
    many events have that colour."""
    none = (-100,) * NAMED_HEADS
    labels = [none] * len(words)
    for i in range(1, len(words)):
        colour, second = words[i - 1], words[i]
        if colour not in COLOURS or second is None:
            continue
        if second == "shape":
            labels[i - 1] = (-100, sum(e.colour == colour for e in video.events), -100, -100, -100, -100)
        elif second in SHAPES:
            named = [(k, e) for k, e in enumerate(video.events, start=1) if (e.colour, e.shape) == (colour, second)]
            if not named:
                labels[i] = (list(COLOURS).index(colour), -100, 0, -100, -100, -100)
                continue
            number, event = named[0]
            other = video.companion(event)
            labels[i] = (list(COLOURS).index(colour), -100, number, event.cell, DURATIONS.index(event.frames),
                         0 if other is None else 1 + list(COLOURS).index(other.colour))
    return labels


class Probes(torch.nn.Module):
    """Training-only linear heads (VIDEO_HEADS, QUESTION_HEADS), dropped when the model is saved. On the
    video tokens they read what each token shows and the features the questions are built from
    (events so far, repeats of a colour, how long an object has been shown, what is shown with it);
    on the question's words, the lookups into the video, one hop each. Without such heads the 5-layer
    model's count and order questions stayed at chance: the answers alone teach the lookups too slowly."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, classes)
                                          for name, _, classes in (*VIDEO_HEADS, *QUESTION_HEADS)})

    def forward(self, vision: torch.Tensor, states: tuple[torch.Tensor, ...], video: torch.Tensor,
                named: torch.Tensor, labels: torch.Tensor, mentions: torch.Tensor) -> torch.Tensor:
        """The loss of each head, in PROBE_HEADS order (0 for a head with no target here). `states`: the
        hidden states of every layer; `video` / `named`: masks of the video tokens / named words."""
        losses, last = [], len(states) - 1  # a model shallower than the heads' layers: its last layer
        for k, (name, layer, _) in enumerate(VIDEO_HEADS):
            tokens = vision if layer == "vision" else states[min(layer, last)][video]
            losses.append(self._loss(name, tokens, labels[:, k]))
        for k, (name, layer, _) in enumerate(QUESTION_HEADS):
            losses.append(self._loss(name, states[min(layer, last)][named], mentions[:, k]))
        return torch.stack(losses)

    def _loss(self, name: str, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not (targets != -100).any():
            return tokens.new_zeros(())
        return F.cross_entropy(self.heads[name](tokens), targets, ignore_index=-100)


def batch_loss(model: Qwen2VLForConditionalGeneration, batch: Batch, probes: Probes | None = None):
    """(answer loss: mean over questions of the mean cross-entropy of their answer tokens,
    probe losses [len(PROBE_HEADS)] (zeros without probes), per-family answer loss [len(TRAIN_KINDS)])."""
    video = model.model.get_video_features(batch.pixels, batch.grids) if len(batch.grids) else None  # text only
    encoded = {"mm_encoder_outputs": {"video": video}} if video is not None else {}
    out = model.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                      output_hidden_states=probes is not None, **encoded)
    where = batch.targets != -100
    logits = model.lm_head(out.last_hidden_state[where]).float()  # only where there is a loss
    losses = F.cross_entropy(logits, batch.targets[where], reduction="none") * batch.weights[where]
    kind = batch.kind[where]
    zeros = torch.zeros(len(TRAIN_KINDS), device=losses.device)
    weight = zeros.index_add(0, kind, batch.weights[where]).clamp(min=1e-9)
    per_family = zeros.index_add(0, kind, losses.detach()) / weight
    answer = losses.sum() / batch.weights.sum()
    if probes is None:
        return answer, answer.new_zeros(len(PROBE_HEADS)), per_family
    named = (batch.mentions != -100).any(dim=-1)
    last = out.last_hidden_state
    vision = torch.cat(video.pooler_output) if video is not None else last.new_zeros(0, last.shape[-1])
    aux = probes(vision, out.hidden_states, batch.ids == model.config.video_token_id, named,
                 batch.labels, batch.mentions[named])
    return answer, aux, per_family


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return config.final_lr + 0.5 * (config.lr - config.final_lr) * (1 + math.cos(math.pi * progress))


def same_run(config: dict) -> dict:
    """The settings that make two runs the same run (threads and device only change the speed)."""
    return {k: v for k, v in config.items() if k not in ("threads", "device", "log_every")}


def train(config: TrainConfig, out: Path | None, log=print,
          checkpoint: Path | None = None) -> tuple[Qwen2VLForConditionalGeneration, dict]:
    """Train from scratch or from `config.init`, or resume from `checkpoint` when that file exists; it is
    rewritten at every log step (the batches are fixed by (seed, step), so a resumed run continues the same run)."""
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    tokenizer = tiny_tokenizer()
    model = build_model(config.model, tokenizer, config.seed)
    base = None
    if config.init:
        base = start_from(model, Path(config.init))
        log(f"fine-tuning {config.init}")
    model = model.to(device).train()
    probes = Probes(config.model.hidden).to(device) if config.probe_weight > 0 else None
    trained = [*model.parameters(), *(probes.parameters() if probes else [])]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    packer = Packer(tokenizer)
    total = sum(stage.steps for stage in config.stages)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f} M parameters; {total} steps in {len(config.stages)} stages")
    done, history, spent = 0, [], 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        if same_run(state["config"]) != same_run(asdict(config)):
            raise ValueError(f"{checkpoint} was written by another training config; delete it to start afresh")
        model.load_state_dict(state["model"])
        if probes is not None:
            probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        done, history, spent = state["step"], state["history"], state["seconds"]
        log(f"resumed from {checkpoint} at step {done}")
    started, step = time.perf_counter() - spent, 0
    for number, stage in enumerate(config.stages, start=1):
        running = []
        for _ in range(stage.steps):
            if step < done:
                step += 1
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total)
            batch = make_batch(packer, config.seed, step, stage, tuple(config.questions), config.pruned).to(device)
            answer, aux, per_family = batch_loss(model, batch, probes)
            optimizer.zero_grad(set_to_none=True)
            (answer + config.probe_weight * aux.sum()).backward()
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            running.append(torch.cat([answer.detach()[None], per_family, aux.detach()]).cpu())
            step += 1
            if step % config.log_every == 0 or step == total:
                mean = torch.stack(running).mean(dim=0).tolist()
                families = dict(zip(TRAIN_KINDS, mean[1:]))
                heads = dict(zip(PROBE_HEADS, mean[1 + len(TRAIN_KINDS):]))
                entry = dict(step=step, stage=number, frames=[stage.min_frames, stage.max_frames], loss=mean[0],
                             families=families, probes=heads, seconds=time.perf_counter() - started)
                history.append(entry)
                log(f"step {step}/{total} ({stage.min_frames}-{stage.max_frames} frames): loss {mean[0]:.3f} "
                    f"[{' '.join(f'{k} {v:.2f}' for k, v in families.items())}] "
                    f"probes [{' '.join(f'{k} {v:.2f}' for k, v in heads.items())}], {entry['seconds']:.0f} s")
                running = []
                if checkpoint is not None:
                    state = dict(config=asdict(config), step=step, history=history, seconds=entry["seconds"],
                                 model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 probes=probes.state_dict() if probes is not None else None)
                    torch.save(state, checkpoint.with_suffix(".tmp"))
                    checkpoint.with_suffix(".tmp").replace(checkpoint)  # never half-written
    record = dict(config=asdict(config), parameters=params, seconds=time.perf_counter() - started, history=history,
                  torch=torch.__version__, transformers=transformers.__version__, base=base)
    model = model.cpu().eval()
    if out is not None:
        save(model, record, out)
        log(f"saved to {out}")
    return model, record


def start_from(model: Qwen2VLForConditionalGeneration, directory: Path) -> dict | None:
    """Load a saved model's weights into `model` (built from the same [model] config); returns the
    training record it was saved with, kept in the fine-tune's record."""
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"init {directory}: no model.safetensors there; give a directory `--out` wrote")
    saved = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"init {directory}: its weights do not fit the [model] config; copy its [model] table "
                         f"({str(exc).splitlines()[0]})") from None
    record = directory / "training.json"
    return json.loads(record.read_text()) if record.is_file() else None


def save(model: Qwen2VLForConditionalGeneration, record: dict, out: Path) -> None:
    """A checkpoint directory load_model takes: config.json + model.safetensors, the tokenizer, the
    vision preset the model was trained at, and the training record.

    The weights are stored in float16, half the size in the repository; config.json keeps float32,
    so the model loads and runs in float32. The rounding moved held-out 192-frame rows by at most
    0.2 points (one question); docs/SYNTHETIC.md of 2026-12-02 was measured on the float32 weights."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    weights = out / "model.safetensors"
    with safe_open(weights, "pt") as stored:
        metadata = stored.metadata()
    save_file({name: tensor.half() for name, tensor in load_file(weights).items()}, weights, metadata=metadata)
    tiny_tokenizer().save_pretrained(out)
    preset = dict(min_pixels=BUILTIN_PRESET.min_pixels, max_pixels=BUILTIN_PRESET.max_pixels)
    (out / PRESET_FILE).write_text(json.dumps(preset, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamer.builtin.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="TOML training config (default: configs/train/builtin.toml)")
    parser.add_argument("--out", type=Path, help="directory for the weights (default: none, nothing saved)")
    parser.add_argument("--checkpoint", type=Path,
                        help="file to resume from if it exists, rewritten at every log step (default: none)")
    parser.add_argument("--init", help="model directory to fine-tune (overrides the config's init)")
    parser.add_argument("--threads", type=int, help="CPU threads (overrides the config)")
    parser.add_argument("--device", help="auto | cpu | cuda (overrides the config)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's steps (e.g. 0.01 for a smoke run)")
    parser.add_argument("--force", action="store_true", help="replace the weights already in --out (e.g. the shipped "
                                                              "built-in model's in streamer/assets/)")
    args = parser.parse_args(argv)
    if args.out is not None and (args.out / "model.safetensors").exists() and not args.force:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} holds weights already (the shipped built-in model's, "
                       "if it is streamer/assets/...); give another --out, or --force to replace them\n")
    config = TrainConfig.from_dict(tomllib.loads(args.config.read_text()))
    if args.init:
        config.init = args.init
    if args.threads:
        config.threads = args.threads
    if args.device:
        config.device = args.device
    for stage in config.stages:
        stage.steps = max(1, round(stage.steps * args.scale))
    train(config, args.out, checkpoint=args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
