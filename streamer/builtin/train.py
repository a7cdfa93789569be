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
first (the vision tower and the question logic are learnt cheaply), then up to 384 frames.
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
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from streamer.engine.models import PRESET_FILE, special_token_ids, resolve_device, tiny_tokenizer
from streamer.engine.positions import text_positions, video_positions
from streamer.engine.prompt import SYSTEM_PROMPT, question_suffix, video_prefix
from streamer.builtin.videos import (BUILTIN_PRESET, COLOURS, FRAME, MAX_EVENTS, MAX_REPEATS, SHAPES, TRAIN_FAMILIES,
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
    min_frames: int  # each batch draws one even length in [min_frames, max_frames]
    max_frames: int
    steps: int
    batch: int  # videos per step


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
    # questions packed after each video; repeats get different draws (more signal for the hard families)
    questions: list[str] = field(default_factory=lambda: list(TRAIN_FAMILIES))
    seed: int = 0
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
        max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=len(tokenizer),
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
    family: torch.Tensor  # [B, L] index in TRAIN_FAMILIES of the answer predicted there, -1 elsewhere
    labels: torch.Tensor  # [video tokens, 4] targets of the training probes (token_labels)
    mentions: torch.Tensor  # [B, L, 3] targets of the question-side probes (mention_labels), -100 elsewhere

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


class Packer:
    """Videos + questions -> packed training sequences."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
        self.prefix = self.encode(video_prefix(SYSTEM_PROMPT))
        self.video_token = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.words = {self.encode(f" {word}")[0]: word for word in (*COLOURS, *SHAPES, "shape")}

    def sample(self, video: SyntheticVideo, families: tuple[str, ...] = TRAIN_FAMILIES) -> dict:
        patches = preprocess_frames(video.frames(), BUILTIN_PRESET)
        grid_t, grid_h, grid_w = patches.grid_thw
        merge = BUILTIN_PRESET.merge_size
        tokens = video_positions(len(self.prefix), 0, grid_t, grid_h // merge, grid_w // merge)
        ids = self.prefix + [self.video_token] * patches.num_tokens
        positions = [text_positions(0, len(self.prefix)), tokens]
        segment = [0] * len(ids)
        targets, weights = [-100] * len(ids), [0.0] * len(ids)
        after = int(tokens.max()) + 1
        family = [-1] * len(ids)
        mentions = [(-100, -100, -100)] * len(ids)
        for k, qa in enumerate(video.questions(families), start=1):
            question, answer = self.encode(question_suffix(qa.question)), self.encode(qa.answer) + [self.end]
            block = question + answer
            start = len(ids)
            ids += block
            positions.append(text_positions(after, len(block)))
            segment += [k] * len(block)
            targets += [-100] * len(block)
            weights += [0.0] * len(block)
            family += [-1] * len(block)
            mentions += mention_labels(video, [self.words.get(token) for token in block])
            for j, token in enumerate(answer):  # the token before each answer token predicts it
                targets[start + len(question) - 1 + j] = token
                weights[start + len(question) - 1 + j] = 1.0 / len(answer)
                family[start + len(question) - 1 + j] = TRAIN_FAMILIES.index(qa.family)
        return dict(ids=ids, positions=torch.cat(positions), segment=segment, targets=targets, weights=weights,
                    family=family, pixels=patches.pixel_values, grid=patches.grid_thw, labels=token_labels(video),
                    mentions=mentions)

    def batch(self, samples: list[dict]) -> Batch:
        length = max(len(s["ids"]) for s in samples)
        n = len(samples)
        ids = torch.full((n, length), self.pad)
        positions = torch.zeros(3, n, length, dtype=torch.long)
        segment = torch.full((n, length), -1)
        targets = torch.full((n, length), -100)
        weights = torch.zeros(n, length)
        family = torch.full((n, length), -1)
        mentions = torch.full((n, length, 3), -100)
        for b, s in enumerate(samples):
            size = len(s["ids"])
            ids[b, :size] = torch.tensor(s["ids"])
            positions[:, b, :size] = s["positions"].t()
            segment[b, :size] = torch.tensor(s["segment"])
            targets[b, :size] = torch.tensor(s["targets"])
            weights[b, :size] = torch.tensor(s["weights"])
            family[b, :size] = torch.tensor(s["family"])
            mentions[b, :size] = torch.tensor(s["mentions"])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        # a query sees the shared context (segment 0) and its own block; padding (-1) sees padding
        visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        return Batch(ids, positions, (visible & causal)[:, None], torch.cat([s["pixels"] for s in samples]),
                     torch.tensor([s["grid"] for s in samples]), targets, weights, family,
                     torch.cat([s["labels"] for s in samples]), mentions)


def make_batch(packer: Packer, seed: int, step: int, stage: Stage,
               questions: tuple[str, ...] = TRAIN_FAMILIES) -> Batch:
    """Deterministic in (seed, step): the length and the videos of this step."""
    rng = np.random.default_rng([seed, step])
    frames = 2 * int(rng.integers(stage.min_frames // 2, stage.max_frames // 2 + 1))
    videos = [make_video(TRAIN_SEEDS + seed * 10**7 + step * stage.batch + i, frames) for i in range(stage.batch)]
    return packer.batch([packer.sample(video, questions) for video in videos])


def token_labels(video: SyntheticVideo) -> torch.Tensor:
    """[video tokens, 4] per token: 1 + the index of the colour and of the shape its frame pair shows
    (0: none); the events started so far; the events of its colour so far (0 on background)."""
    labels = torch.zeros(video.num_frames // 2, 4, dtype=torch.long)
    for number, event in enumerate(video.events, start=1):
        first, end = event.start // 2, (event.start + event.frames) // 2
        labels[first:end, 0] = 1 + list(COLOURS).index(event.colour)
        labels[first:end, 1] = 1 + SHAPES.index(event.shape)
        labels[first:, 2] = number
        labels[first:end, 3] = sum(e.colour == event.colour for e in video.events[:number])
    tokens_per_pair = (FRAME // (BUILTIN_PRESET.patch_size * BUILTIN_PRESET.merge_size)) ** 2
    return labels.repeat_interleave(tokens_per_pair, dim=0)


def mention_labels(video: SyntheticVideo, words: list[str | None]) -> list[tuple[int, int, int]]:
    """Per question token: (the number of the event a "{colour} {shape}" ending here names, 0 if none in
    the video; at the colour of a "{colour} shape", how many events have that colour; the colour of a
    "{colour} {shape}" ending here), -100 elsewhere."""
    labels = [(-100, -100, -100)] * len(words)
    for i in range(1, len(words)):
        colour, second = words[i - 1], words[i]
        if colour not in COLOURS or second is None:
            continue
        if second == "shape":  # on the colour word itself: one hop from the question into the video
            labels[i - 1] = (-100, sum(e.colour == colour for e in video.events), -100)
        elif second in SHAPES:
            number = [k for k, e in enumerate(video.events, start=1) if (e.colour, e.shape) == (colour, second)]
            labels[i] = (number[0] if number else 0, -100, list(COLOURS).index(colour))
    return labels


PROBE_HEADS = ("colour", "shape", "events", "repeats", "named_event", "named_count", "named_colour")


class Probes(torch.nn.Module):
    """Training-only linear heads, dropped when the model is saved. On the video tokens entering the
    LLM they read colour and shape (the vision tower learns to see long before the answers alone would
    teach it); after layer 2, how many events, and how many of the token's colour, have started so far
    (features that counting and ordering questions are built from). On the question's words, the
    lookups into the video, one hop each: after layer 1 the colour of a "{colour} {shape}" (copied
    from the word before), after layer 2 the count of a colour named, after layer 3 the event number
    of an object named. Without them `count` and `order` stayed at chance: the answers alone teach
    the lookups too slowly."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, 1 + len(COLOURS))
        self.shape = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.events = torch.nn.Linear(hidden, 1 + MAX_EVENTS)
        self.repeats = torch.nn.Linear(hidden, 1 + MAX_REPEATS)
        self.named_event = torch.nn.Linear(hidden, 1 + MAX_EVENTS)
        self.named_count = torch.nn.Linear(hidden, 1 + MAX_REPEATS)
        self.named_colour = torch.nn.Linear(hidden, len(COLOURS))

    def forward(self, vision: torch.Tensor, middle: torch.Tensor, labels: torch.Tensor, question_first: torch.Tensor,
                question_middle: torch.Tensor, question_lookup: torch.Tensor, mentions: torch.Tensor) -> torch.Tensor:
        """The loss of each head, in PROBE_HEADS order (0 for a question head with no target here)."""
        video = [(self.colour, vision), (self.shape, vision), (self.events, middle), (self.repeats, middle)]
        losses = [F.cross_entropy(head(tokens), labels[:, k]) for k, (head, tokens) in enumerate(video)]
        question = [(self.named_event, question_lookup), (self.named_count, question_middle),
                    (self.named_colour, question_first)]
        for k, (head, tokens) in enumerate(question):
            targets = mentions[:, k]
            losses.append(F.cross_entropy(head(tokens), targets, ignore_index=-100) if (targets != -100).any()
                          else tokens.new_zeros(()))
        return torch.stack(losses)


def batch_loss(model: Qwen2VLForConditionalGeneration, batch: Batch, probes: Probes | None = None):
    """(answer loss: mean over questions of the mean cross-entropy of their answer tokens,
    probe losses [len(PROBE_HEADS)] (zeros without probes), per-family answer loss [len(TRAIN_FAMILIES)])."""
    video = model.model.get_video_features(batch.pixels, batch.grids)
    out = model.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                      mm_encoder_outputs={"video": video}, output_hidden_states=probes is not None)
    where = batch.targets != -100
    logits = model.lm_head(out.last_hidden_state[where]).float()  # only where there is a loss
    losses = F.cross_entropy(logits, batch.targets[where], reduction="none") * batch.weights[where]
    family = batch.family[where]
    zeros = torch.zeros(len(TRAIN_FAMILIES), device=losses.device)
    weight = zeros.index_add(0, family, batch.weights[where]).clamp(min=1e-9)
    per_family = zeros.index_add(0, family, losses.detach()) / weight
    answer = losses.sum() / batch.weights.sum()
    if probes is None:
        return answer, answer.new_zeros(len(PROBE_HEADS)), per_family
    # hidden_states[k] is the output of layer k: the question's words are read one layer after the
    # video tokens' event features, which that layer's attention can then look up
    states = out.hidden_states
    middle, lookup = states[min(2, len(states) - 1)], states[min(3, len(states) - 1)]
    named = (batch.mentions != -100).any(dim=-1)
    aux = probes(torch.cat(video.pooler_output), middle[batch.ids == model.config.video_token_id], batch.labels,
                 states[1][named], middle[named], lookup[named], batch.mentions[named])
    return answer, aux, per_family


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return config.final_lr + 0.5 * (config.lr - config.final_lr) * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig, out: Path | None, log=print) -> tuple[Qwen2VLForConditionalGeneration, dict]:
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    tokenizer = tiny_tokenizer()
    model = build_model(config.model, tokenizer, config.seed).to(device).train()
    probes = Probes(config.model.hidden).to(device) if config.probe_weight > 0 else None
    trained = [*model.parameters(), *(probes.parameters() if probes else [])]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    packer = Packer(tokenizer)
    total = sum(stage.steps for stage in config.stages)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f} M parameters; {total} steps in {len(config.stages)} stages")
    started, step, history = time.perf_counter(), 0, []
    for number, stage in enumerate(config.stages, start=1):
        running = []
        for _ in range(stage.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total)
            batch = make_batch(packer, config.seed, step, stage, tuple(config.questions)).to(device)
            answer, aux, per_family = batch_loss(model, batch, probes)
            optimizer.zero_grad(set_to_none=True)
            (answer + config.probe_weight * aux.sum()).backward()
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            running.append(torch.cat([answer.detach()[None], per_family, aux.detach()]).cpu())
            step += 1
            if step % config.log_every == 0 or step == total:
                mean = torch.stack(running).mean(dim=0).tolist()
                families = dict(zip(TRAIN_FAMILIES, mean[1:]))
                heads = dict(zip(PROBE_HEADS, mean[1 + len(TRAIN_FAMILIES):]))
                entry = dict(step=step, stage=number, frames=[stage.min_frames, stage.max_frames], loss=mean[0],
                             families=families, probes=heads, seconds=time.perf_counter() - started)
                history.append(entry)
                log(f"step {step}/{total} ({stage.min_frames}-{stage.max_frames} frames): loss {mean[0]:.3f} "
                    f"[{' '.join(f'{k} {v:.2f}' for k, v in families.items())}] "
                    f"probes [{' '.join(f'{k} {v:.2f}' for k, v in heads.items())}], {entry['seconds']:.0f} s")
                running = []
    record = dict(config=asdict(config), parameters=params, seconds=time.perf_counter() - started, history=history,
                  torch=torch.__version__, transformers=transformers.__version__)
    model = model.cpu().eval()
    if out is not None:
        save(model, record, out)
        log(f"saved to {out}")
    return model, record


def save(model: Qwen2VLForConditionalGeneration, record: dict, out: Path) -> None:
    """A checkpoint directory load_model takes: config.json + model.safetensors, the tokenizer, the
    vision preset the model was trained at, and the training record."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    preset = dict(min_pixels=BUILTIN_PRESET.min_pixels, max_pixels=BUILTIN_PRESET.max_pixels)
    (out / PRESET_FILE).write_text(json.dumps(preset, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamer.builtin.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="TOML training config (default: configs/train/builtin.toml)")
    parser.add_argument("--out", type=Path, help="directory for the weights (default: none, nothing saved)")
    parser.add_argument("--threads", type=int, help="CPU threads (overrides the config)")
    parser.add_argument("--device", help="auto | cpu | cuda (overrides the config)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's steps (e.g. 0.01 for a smoke run)")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(tomllib.loads(args.config.read_text()))
    if args.threads:
        config.threads = args.threads
    if args.device:
        config.device = args.device
    for stage in config.stages:
        stage.steps = max(1, round(stage.steps * args.scale))
    train(config, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
