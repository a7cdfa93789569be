"""Teach the built-in model to read a long stream's memory: fine-tune it on long streams as a bounded memory
gives them.

    python -m streamer.builtin.train_long --config configs/train/builtin_long.toml --out my-builtin-long \\
        --checkpoint long.ckpt      # resumable: rerun the same command after an interruption

Each step streams a long stream of generated videos (streamer/builtin/streams.py, training seeds) through the
runner under the configured memory and budget, with no gradients: that memory, thinned and re-timed, with the
evicted chunks a question recalls, is what the model is given in service. Then the questions about the stream's parts are taught over it: each question
and its answer run over the memory's keys and values with gradients, and the loss is the answer's tokens and
<|im_end|>, the mean per question. With `mid_stream`, the middle part's questions are also taught right after
it, over the memory as it stood then. The memory is rebuilt with the current weights at every step, so what
the model learns to read is what it now writes; its keys and values themselves get no gradient (what is
trained is the reading: every layer's weights as the question's tokens use them). The vision tower is frozen.
The stream length and the videos of every step are fixed by (seed, step).

Since the video tokens' own processing gets no gradient, it drifts as the shared weights learn to read: at
step 230 of the first run the 384-frame accuracy had fallen from 96 to 82 (docs/MEMORY.md). `replay` adds,
at each step, the init model's own training loss (streamer.builtin.train: full context, gradients through
the video) on a few videos of 128-384 frames, with that weight.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from memory.store import KVMemory
from streamer.builtin.streams import PARTS, SEGMENT, make_stream
from streamer.builtin.train import TRAIN_KINDS, TRAIN_SEEDS, Packer, Stage, batch_loss, make_batch, same_run, save
from streamer.builtin.videos import QA
from streamer.config import load_config
from streamer.engine.models import checkpoint_directory, load_model
from streamer.engine.positions import text_positions
from streamer.engine.recall import recall
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.engine.view import MemoryView


@dataclass
class LongTrainConfig:
    init: str = "builtin"  # the model to fine-tune: a built-in name or a directory train.py wrote
    memory: str = "stream_default"  # the config whose memory (policy, probe, age_power) streams are read through
    budget: int = 512  # tokens per layer on average (the service's 8,192 scaled to the builtin's 9 per frame pair)
    recall: int = 256  # evicted tokens per layer a question brings back, and the host's bound (the service's
    host_budget: int = 1024  # 4,096 and 16,384 scaled alike): the questions read what the service would give them
    chunk_frames: int = 16
    videos: list[int] = field(default_factory=lambda: [2, 8])  # videos of SEGMENT frames per stream: [least, most]
    mid_stream: bool = True
    steps: int = 300
    lr: float = 3e-4
    final_lr: float = 3e-5  # cosine decay to this over all steps
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    # > 0: each step also takes the init model's own training loss on `replay_videos` videos of 128-384 frames
    # (full context, gradients through the video), times this weight, to keep what it knew (0: off)
    replay: float = 0.0
    replay_videos: int = 2

    @classmethod
    def from_dict(cls, data: dict) -> "LongTrainConfig":
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown long-stream training config keys: {sorted(unknown)}")
        config = cls(**data)
        if not (len(config.videos) == 2 and 1 <= config.videos[0] <= config.videos[1]):
            raise ValueError(f"videos must be [least, most] with 1 <= least <= most, got {config.videos}")
        if config.steps < 1 or config.budget < 1:
            raise ValueError(f"need steps >= 1 and budget >= 1, got {config.steps}, {config.budget}")
        if config.replay < 0 or config.replay_videos < 1:
            raise ValueError(f"need replay >= 0 and replay_videos >= 1, got {config.replay}, {config.replay_videos}")
        return config


def run_of(saved: dict) -> dict:
    """A checkpoint's config as the settings that make a run, keys added since it was written at their defaults."""
    return same_run({**asdict(LongTrainConfig()), **saved})


REPLAY = Stage(128, 384, 1, 1)  # the length of the init model's last training stage (streamer.builtin.train)


def answer_loss(runner: Runner, memory: KVMemory, questions: list[QA]) -> torch.Tensor:
    """Mean over questions of the cross-entropy of each answer's tokens and <|im_end|>, read over the memory as a
    question gets it (with the evicted chunks it recalls) at the positions an answer would have; the memory's keys
    and values are constants."""
    end = runner.tokenizer.convert_tokens_to_ids("<|im_end|>")
    losses = []
    for qa in questions:
        question, answer = runner.suffix_ids(qa.question), [*runner.encode(qa.answer), end]
        with torch.no_grad():
            read = recall(runner, memory, question)
        context = [(keys.clone(), values.clone()) for keys, values in read.context()]  # plain tensors, off inference
        ids = question + answer
        view = MemoryView(context, extra=len(ids))
        hidden = runner.forward_layers(runner.embed_tokens(ids), text_positions(memory.next_position, len(ids)), view)
        logits = runner.logits(hidden[0, len(question) - 1:-1])  # the row before each answer token predicts it
        losses.append(F.cross_entropy(logits, torch.tensor(answer, device=logits.device)))
    return torch.stack(losses).mean()


def learning_rate(config: LongTrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.final_lr + 0.5 * (config.lr - config.final_lr) * (1 + math.cos(math.pi * progress))


def unique(questions: list[QA]) -> list[QA]:
    return list({qa.question: qa for qa in questions}.values())  # a one-video stream's parts are one video


def train_long(config: LongTrainConfig, out: Path | None, log=print, checkpoint: Path | None = None) -> dict:
    torch.set_num_threads(config.threads)
    loaded = load_model(config.init, device="cpu", dtype="float32")
    runner = Runner(loaded)
    model = runner.model
    memory_config = load_config(config.memory)
    limits = dict(memory_config.memory.limits(), budget=config.budget, recall=config.recall,
                  host_budget=config.host_budget or None)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith("model.visual"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    record_file = checkpoint_directory(config.init) / "training.json"  # what the fine-tuned model came from
    base = json.loads(record_file.read_text()) if record_file.is_file() else None
    packer = Packer(runner.tokenizer)  # replayed questions drawn as the init model learned them
    questions = tuple((base or {}).get("config", {}).get("questions") or TRAIN_KINDS)
    done, history, spent = 0, [], 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint)
        if run_of(state["config"]) != same_run(asdict(config)):
            raise ValueError(f"{checkpoint} was written by another training config; delete it to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done, history, spent = state["step"], state["history"], state["seconds"]
        log(f"resumed from {checkpoint} at step {done}")
    started, running = time.perf_counter() - spent, []
    for step in range(done, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        count = int(np.random.default_rng([config.seed, step]).integers(config.videos[0], config.videos[1] + 1))
        stream = make_stream(config.seed * 10**6 + step, count, first_video=TRAIN_SEEDS)
        frames, middle_end = stream.frames(), (stream.parts["middle"] + 1) * SEGMENT
        memory = runner.new_memory(**limits)
        losses = []
        ingest_video(runner, frames[:middle_end], memory_config.make_policy(), config.chunk_frames, memory)
        if config.mid_stream and middle_end < len(frames):
            losses.append(answer_loss(runner, memory, stream.questions["middle"]))
        ingest_video(runner, frames[middle_end:], memory_config.make_policy(), config.chunk_frames, memory)
        losses.append(answer_loss(runner, memory, unique([qa for part in PARTS for qa in stream.questions[part]])))
        loss = torch.stack(losses).mean()
        if config.replay:
            batch = make_batch(packer, config.seed, step, replace(REPLAY, batch=config.replay_videos), questions)
            loss = loss + config.replay * batch_loss(model, batch)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        running.append(float(loss.detach()))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            entry = dict(step=step + 1, loss=float(np.mean(running)), seconds=time.perf_counter() - started)
            history.append(entry)
            log(f"step {step + 1}/{config.steps}: loss {entry['loss']:.3f} (streams of {config.videos[0]}-"
                f"{config.videos[1]} videos), {entry['seconds']:.0f} s")
            running = []
            if checkpoint is not None:
                state = dict(config=asdict(config), step=step + 1, history=history, seconds=entry["seconds"],
                             model=model.state_dict(), optimizer=optimizer.state_dict())
                torch.save(state, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)  # never half-written
    record = dict(long_stream=asdict(config), seconds=time.perf_counter() - started, history=history,
                  torch=torch.__version__, transformers=transformers.__version__, base=base)
    if out is not None:
        save(model.eval(), record, out)
        log(f"saved to {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamer.builtin.train_long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML config (default: the LongTrainConfig defaults)")
    parser.add_argument("--out", type=Path, help="directory for the weights (default: none, nothing saved)")
    parser.add_argument("--checkpoint", type=Path,
                        help="file to resume from if it exists, rewritten at every log step (default: none)")
    parser.add_argument("--init", help="the model to fine-tune (overrides the config's init)")
    parser.add_argument("--steps", type=int, help="steps (overrides the config)")
    parser.add_argument("--threads", type=int, help="CPU threads (overrides the config)")
    parser.add_argument("--force", action="store_true", help="replace the weights already in --out")
    parser.add_argument("--export", action="store_true", help="write --checkpoint's weights as they are to --out "
                        "and stop (a look at a run that is still going: evaluate it with --model OUT)")
    args = parser.parse_args(argv)
    if args.export and (args.out is None or args.checkpoint is None or not args.checkpoint.exists()):
        parser.exit(2, f"{parser.prog}: error: --export needs --out and an existing --checkpoint\n")
    if args.out is not None and (args.out / "model.safetensors").exists() and not args.force:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} holds weights already; give another --out, or "
                       "--force to replace them\n")
    data = tomllib.loads(args.config.read_text()) if args.config else {}
    for key in ("init", "steps", "threads"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.export:
        print(export(LongTrainConfig.from_dict(data), args.checkpoint, args.out))
        return 0
    train_long(LongTrainConfig.from_dict(data), args.out, checkpoint=args.checkpoint)
    return 0


def export(config: LongTrainConfig, checkpoint: Path, out: Path) -> str:
    """The checkpoint's weights as a model directory, with a record saying at which step they were taken."""
    state = torch.load(checkpoint)
    if run_of(state["config"]) != same_run(asdict(config)):
        raise ValueError(f"{checkpoint} was written by another training config than the one given")
    model = load_model(config.init, device="cpu", dtype="float32").model
    model.load_state_dict(state["model"])
    record = dict(long_stream=asdict(config), seconds=state["seconds"], history=state["history"],
                  exported_at_step=state["step"], torch=torch.__version__, transformers=transformers.__version__)
    save(model.eval(), record, out)
    return f"wrote {out}: the weights at step {state['step']} of {config.steps}"


if __name__ == "__main__":
    raise SystemExit(main())
