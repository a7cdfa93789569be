"""How much of what the questions need each memory policy keeps, on held-out procedural videos
(`streamer eval synthetic`).

Every video (seeds below streamer.builtin.train.TRAIN_SEEDS: never trained on) is streamed through
the runner chunk by chunk under each policy, and the memory built once per video and policy (the
generic probe makes it question-agnostic) answers one question of every family. Per policy and
video length it reports:

- accuracy, with a 95% bootstrap interval over videos;
- memory_fraction: memory tokens (mean over layers, prompt text included) / full-context tokens;
- answer_js: the Jensen-Shannon divergence between the first answer token's distribution from the
  memory and from the full context, mean over questions -- a continuous fidelity figure that moves
  before accuracy does;
- vs_uniform: the paired difference in accuracy to uniform pruning at the same memory on the same
  videos, with a 95% bootstrap interval over videos. Uniform runs at several ratios (and the full
  context is uniform at 1.0); each video's uniform score is interpolated linearly in memory
  fraction to the policy's memory, so "at equal memory" is exact, not one matched point;
- oracle rows: a memory that keeps, in every layer, exactly the tokens that show an event (the
  generator knows them), plus k probe-ranked tokens per chunk -- the headroom an allocator has.

pyramid and window get EMLoC's fraction of video tokens as their ratio, so they hold about as many
tokens; a policy may also be given as NAME:CONFIG, its options (and probe) read from a TOML config.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

from memory.baselines import LayerRatios
from memory.policy import ChunkContext, MemoryPolicy, ProbedPolicy, Selection
from memory.probe import ProbeConfig, js_divergence, kept_indices
from memory.registry import make_policy
from streamer.builtin.train import TRAIN_SEEDS
from streamer.builtin.videos import BUILTIN_PRESET, QUESTION_KINDS, QA, make_video
from streamer.config import load_config
from streamer.engine.models import checkpoint_directory, load_model, resolve_device
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.text import counted

MATCHED = ("pyramid", "window")  # baselines given EMLoC's memory ratio


@dataclass
class EvalConfig:
    model: str = "builtin"
    lengths: list[int] = field(default_factory=lambda: [192, 384])
    videos: int = 100  # per length; seeds first_seed .. first_seed + videos - 1
    first_seed: int = 0
    chunk_frames: int = 64
    # full and uniform always run; NAME:CONFIG takes the options of a config (stream_default: the default memory)
    # the first emloc entry sets the memory ratio of the MATCHED baselines
    policies: list[str] = field(default_factory=lambda: ["emloc:stream_default", "emloc:videomme_emloc",
                                                         "emloc:emloc_reference", *MATCHED])
    # dense where the policies' memories fall: accuracy is concave in memory, so linear interpolation
    # between far-apart points would understate uniform and flatter every policy compared with it
    uniform_ratios: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3])
    oracle_extra: list[int] = field(default_factory=lambda: [0, 2])  # oracle rows: events + k tokens per chunk
    ablate_layers: float = 0.02  # at the longest length, one row per layer pruned alone to this ratio (0: none)
    # chosen on validation seeds 900000.. at 384 frames as the setting that keeps <= 10% of the tokens
    # (delta 0.01 / 0.04 / 0.1 kept 30 / 19 / 8%); the ratios are the paper's, groups are half the layers
    delta: float = 0.1
    ratios: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.5, 1.0])
    group_size: int = 2
    probe: str = "generic"
    bootstrap: int = 2000  # resamples of the videos for each interval
    device: str = "auto"
    threads: int = 1  # per process
    workers: int = 2  # processes, each measuring every policy on its share of the videos

    def validate(self) -> "EvalConfig":
        if self.first_seed < 0 or self.first_seed + self.videos > TRAIN_SEEDS:
            raise ValueError(f"held-out seeds must lie in 0..{TRAIN_SEEDS - 1}; training uses the seeds above")
        if self.workers < 1 or self.threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {self.workers} and {self.threads}")
        if self.videos < 2:
            raise ValueError(f"need at least 2 videos per length for intervals, got {self.videos}")
        if not self.uniform_ratios or not all(0 < r < 1 for r in self.uniform_ratios):
            raise ValueError(f"uniform ratios must be in (0, 1), got {self.uniform_ratios}")
        if not 0 <= self.ablate_layers < 1:
            raise ValueError(f"the layer ablation ratio must be in [0, 1), got {self.ablate_layers}")
        if any(k < 0 for k in self.oracle_extra):
            raise ValueError(f"oracle extra tokens must be >= 0, got {self.oracle_extra}")
        return self


@dataclass(kw_only=True)
class OraclePolicy(ProbedPolicy):
    """Keeps, in every layer, exactly the video tokens that show an event (known from the generator) and
    the chunk's last frame pair, plus the `extra` best probe-ranked other tokens per chunk and KV head.

    The last pair is there because the builtin model reads what it knows about the whole video from
    the tokens just before the question (they attend to everything before them): with the events'
    tokens alone it answers nothing (0.5% on 40 validation videos at 384 frames), with each chunk's
    last pair as well 88% at 5.6% of the tokens (10 videos)."""

    name = "oracle"
    events: np.ndarray  # bool [frame pairs, rows, columns] of the whole video
    extra: int = 0

    def select(self, ctx: ChunkContext) -> Selection:
        video = ~ctx.protected
        where = ctx.positions[video]
        where = where - int(where[:, 1].min())  # (t, h, w) - s: the block starts at s, rows at 0
        shows = ctx.protected.clone()
        shows[video] = torch.from_numpy(self.events)[where[:, 0], where[:, 1], where[:, 2]] | (
            where[:, 0] == where[:, 0].max())
        keep = shows.expand(ctx.model.kv_heads, -1)
        if not self.extra:
            return Selection([kept_indices(keep)] * ctx.model.num_layers)
        started = time.perf_counter()
        scores = self.probe_scores(ctx)[1]
        probe_s = time.perf_counter() - started
        extra = min(self.extra, int((~shows).sum()))
        kept = []
        for layer_scores in scores:
            best = layer_scores.masked_fill(shows, float("-inf")).topk(extra, dim=1).indices
            kept.append(kept_indices(keep.clone().scatter_(1, best, True)))
        return Selection(kept, scores, timings=dict(probe=probe_s))


@dataclass
class Run:
    """One policy (with its options) over the videos of one length."""

    policy: str  # emloc, uniform, oracle, ...
    label: str  # as shown in tables: "uniform 0.05", "oracle + 2", "emloc (emloc_reference)"
    options: dict
    correct: list[list[bool]] = field(default_factory=list)  # [video][question]
    answer_js: list[list[float]] = field(default_factory=list)
    memory_tokens: list[float] = field(default_factory=list)  # per video
    full_tokens: list[int] = field(default_factory=list)
    chunk_timings: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def memory_fraction(self) -> float:
        return sum(self.memory_tokens) / sum(self.full_tokens)

    def scores(self) -> np.ndarray:
        """Per video: the fraction of its questions answered right."""
        return np.array([np.mean(c) for c in self.correct])

    def mean_js(self) -> np.ndarray:
        return np.array([np.mean(j) for j in self.answer_js])


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values` (one per video), resampling the videos."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def uniform_at(sweep: list[Run], fraction: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-video uniform scores and answer JS interpolated linearly in memory fraction to `fraction`;
    None outside the sweep (no extrapolation)."""
    points = sorted(sweep, key=lambda run: run.memory_fraction)
    fractions = [run.memory_fraction for run in points]
    if not fractions[0] <= fraction <= fractions[-1]:
        return None
    i = min(max(int(np.searchsorted(fractions, fraction)) - 1, 0), len(points) - 2)
    low, high = points[i], points[i + 1]
    w = (fraction - fractions[i]) / (fractions[i + 1] - fractions[i]) if fractions[i + 1] > fractions[i] else 0.0
    return (1 - w) * low.scores() + w * high.scores(), (1 - w) * low.mean_js() + w * high.mean_js()


def summarize(run: Run, frames: int, sweep: list[Run], resamples: int) -> dict:
    """One result row: what --json writes per policy and length."""
    scores = run.scores()
    families = np.array(run.correct).mean(axis=0) * 100
    timings = {key: float(np.mean([t.get(key, 0.0) for t in run.chunk_timings])) for key in ("probe", "search")}
    row = dict(policy=run.policy, label=run.label, options=run.options, frames=frames, videos=len(scores),
               accuracy=100 * float(scores.mean()),
               accuracy_interval=[100 * v for v in bootstrap_interval(scores, resamples)],
               families=dict(zip(QUESTION_KINDS, families.tolist())), memory_fraction=run.memory_fraction,
               memory_tokens=float(np.mean(run.memory_tokens)), full_tokens=float(np.mean(run.full_tokens)),
               answer_js=float(run.mean_js().mean()), probe_s_per_chunk=timings["probe"],
               search_s_per_chunk=timings["search"], seconds=run.seconds,
               correct=run.correct)  # [video][question], families in order: pairs two runs on the same videos
    if run.policy != "uniform":
        matched = uniform_at(sweep, run.memory_fraction)
        if matched is None:  # below the smallest uniform ratio: add a smaller one to compare
            row.update(vs_uniform=None, vs_uniform_interval=None, uniform_answer_js=None)
        else:
            uniform_scores, uniform_js = matched
            difference = scores - uniform_scores
            row.update(vs_uniform=100 * float(difference.mean()),
                       vs_uniform_interval=[100 * v for v in bootstrap_interval(difference, resamples)],
                       uniform_answer_js=float(uniform_js.mean()))
    return row


def policy_entry(name: str, config: EvalConfig) -> tuple[str, str, dict, ProbeConfig]:
    """(policy, label, options, probe) for a --policies entry: NAME, or NAME:CONFIG to read the
    options and probe from a TOML config (a path or a name in configs/)."""
    name, _, source = name.partition(":")
    probe = ProbeConfig(mode=config.probe)
    if source:
        preset = load_config(source)
        return name, f"{name} ({source})", dict(preset.policies.get(name, {})), preset.probe
    if name == "emloc":
        return name, name, dict(delta=config.delta, ratios=config.ratios, group_size=config.group_size), probe
    return name, name, {}, probe


def run_policy(runner: Runner, clips: list, run: Run, make, chunk_frames: int, question_probe: bool,
               reference: list[list[torch.Tensor]] | None = None) -> list[list[torch.Tensor]]:
    """Stream every clip under `make(video, question)`'s policy, answer its questions, score them against
    the answers and (answer JS) against `reference`, the full context's first-token logits; returns the
    first-token logits per video and question."""
    started = time.perf_counter()
    first_logits = []
    for v, (video, frames, questions) in enumerate(clips):
        # question probe mode: the memory is built per question (the paper's way)
        groups = [[k] for k in range(len(questions))] if question_probe else [list(range(len(questions)))]
        correct, logits, memory_tokens = [False] * len(questions), [None] * len(questions), []
        for group in groups:
            memory = ingest_video(runner, frames, make(video, questions[group[0]].question), chunk_frames)
            memory_tokens.append(memory.mean_tokens())
            run.chunk_timings += [chunk.timings for chunk in memory.chunks]
            for k in group:
                qa = questions[k]
                answer = runner.answer(memory, qa.question, max_new_tokens=4)
                correct[k], logits[k] = answer.text.strip() == qa.answer, answer.first_logits
        run.correct.append(correct)
        run.answer_js.append([0.0 if reference is None else js_divergence(reference[v][k][None], logits[k][None])
                              for k in range(len(questions))])
        run.memory_tokens.append(float(np.mean(memory_tokens)))
        run.full_tokens.append(memory.full_tokens)
        first_logits.append(logits)
    run.seconds = time.perf_counter() - started
    return first_logits


@dataclass(frozen=True)
class RunSpec:
    """One row to measure: a registry policy with its options and probe, an oracle, or a layer ablation
    (plain data, so that worker processes can receive it)."""

    policy: str
    label: str
    options: dict
    probe: ProbeConfig

    def make(self, video, question: str) -> MemoryPolicy:
        probe = probe_for(self.probe, question)
        if self.policy == "oracle":
            return OraclePolicy(events=video.event_tokens(), extra=self.options["extra"], probe=probe)
        if self.policy == "layer ablation":
            return LayerRatios(layer_ratios={self.options["layer"]: self.options["ratio"]}, probe=probe)
        return make_policy(self.policy, self.options, probe)


_runner: Runner | None = None  # this process's model, loaded by load_runner_once
_runner_key: tuple | None = None


def load_runner_once(model: str, device: str, threads: int) -> None:
    """Load the model into this process (a worker's initializer, or the parent's when there are none)."""
    global _runner, _runner_key
    torch.set_num_threads(threads)
    if _runner_key != (model, device):
        loaded = load_model(model, device=device, dtype="float32")
        _runner, _runner_key = Runner(loaded, preset=loaded.preset or BUILTIN_PRESET), (model, device)


def measure_part(length: int, seeds: list[int], specs: list[RunSpec], chunk_frames: int, question_probe: bool,
                 reference: list | None) -> tuple[list[Run], list]:
    """Stream the videos `seeds` of `length` frames under each spec in order; a "full" spec's first-token
    logits become the reference the later specs' answer JS is measured against. Returns the runs
    and the reference."""
    clips = clips_of(length, tuple(seeds))
    runs = []
    for number, spec in enumerate(specs, 1):
        run = Run(spec.policy, spec.label, spec.options)
        logits = run_policy(_runner, clips, run, spec.make, chunk_frames, question_probe, reference)
        if spec.policy == "full":
            reference = logits
        runs.append(run)
        # progress inside a wave (a wave of the quick run is minutes long), from each worker process
        print(f"  {length} frames, {spec.label} ({number} of {len(specs)}): {counted(len(seeds), 'video')} "
              f"(seeds {seeds[0]}-{seeds[-1]}) in {run.seconds:.0f} s", file=sys.stderr, flush=True)
    return runs, reference


@functools.lru_cache(maxsize=1)  # the second wave streams the same videos: render them once
def clips_of(length: int, seeds: tuple[int, ...]) -> list[tuple]:
    """(video, its frames, its questions) for each seed."""
    return [(video, video.frames(), video.questions()) for video in (make_video(seed, length) for seed in seeds)]


def merged(parts: list[Run]) -> Run:
    """One run over the videos of all parts, in order (seconds: the longest part's, the wall time)."""
    first = parts[0]
    run = Run(first.policy, first.label, first.options)
    for part in parts:
        run.correct += part.correct
        run.answer_js += part.answer_js
        run.memory_tokens += part.memory_tokens
        run.full_tokens += part.full_tokens
        run.chunk_timings += part.chunk_timings
    run.seconds = max(part.seconds for part in parts)
    return run


def evaluate(config: EvalConfig, log=print) -> dict:
    """{"results": rows (see summarize), "chance": {frames: rows}, "config": ...}.

    The videos are split into `config.workers` parts measured in parallel processes of
    `config.threads` threads each (one process when workers is 1); every part streams its own
    videos under every policy, so results equal a single process's."""
    config.validate()
    load_runner_once(config.model, config.device, config.threads)
    prefix, layers = len(_runner.prefix_ids), _runner.num_layers
    question_probe = config.probe == "question"
    probe = ProbeConfig(mode=config.probe)
    seeds = list(range(config.first_seed, config.first_seed + config.videos))
    parts = [[int(s) for s in part] for part in np.array_split(seeds, min(config.workers, len(seeds)))]
    pool = None
    if len(parts) > 1:
        pool = ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=load_runner_once, initargs=(config.model, config.device, config.threads))
    results, chance = [], {}
    try:
        for length in config.lengths:
            chance[length] = chance_rows([qa for seed in seeds for qa in make_video(seed, length).questions()])

            def measure(specs: list[RunSpec], references: list | None = None) -> tuple[list[Run], list]:
                """Each spec over every part; returns the merged runs (logged) and each part's reference."""
                jobs = [(length, part, specs, config.chunk_frames, question_probe,
                         None if references is None else references[k]) for k, part in enumerate(parts)]
                done = list(pool.map(measure_part, *zip(*jobs))) if pool else [measure_part(*job) for job in jobs]
                runs = [merged([d[0][i] for d in done]) for i in range(len(specs))]
                for run in runs:
                    log(f"{length} frames, {run.label}: {100 * run.scores().mean():.1f}%, memory "
                        f"{100 * run.memory_fraction:.1f}%, answer JS {run.mean_js().mean():.4f}, {run.seconds:.0f} s")
                return runs, [d[1] for d in done]

            # first wave: everything but the baselines that get EMLoC's memory ratio
            entries = [policy_entry(entry, config) for entry in config.policies]
            first = [RunSpec("full", "full", {}, probe)]
            first += [RunSpec("uniform", f"uniform {r:g}", dict(ratio=r), probe) for r in sorted(config.uniform_ratios)]
            first += [RunSpec(name, label, options, entry_probe) for name, label, options, entry_probe in entries
                      if name not in MATCHED]
            first += [RunSpec("oracle", f"oracle + {k}" if k else "oracle", dict(extra=k), probe)
                      for k in config.oracle_extra]
            if config.ablate_layers and length == max(config.lengths):
                first += [RunSpec("layer ablation", f"layer {layer} alone at {config.ablate_layers:g}",
                                  dict(layer=layer, ratio=config.ablate_layers), probe) for layer in range(layers)]
            runs, references = measure(first)
            by_label = {run.label: run for run in runs}
            emloc = next((run for run in runs if run.policy == "emloc"), None)
            second = []
            for name, label, options, entry_probe in entries:
                if name in MATCHED:
                    if emloc is None:
                        raise ValueError(f"{name} gets EMLoC's memory ratio: put an emloc entry in --policies")
                    text = prefix * len(emloc.memory_tokens)
                    ratio = max(1e-3, (sum(emloc.memory_tokens) - text) / (sum(emloc.full_tokens) - text))
                    second.append(RunSpec(name, label, {**options, "ratio": ratio}, entry_probe))
            if second:
                by_label.update({run.label: run for run in measure(second, references)[0]})
            full = by_label["full"]
            sweep = [run for run in runs if run.policy == "uniform"]
            full_as_uniform = Run("uniform", "uniform 1", dict(ratio=1.0), full.correct, full.answer_js,
                                  full.memory_tokens, full.full_tokens)
            order = ["full", *(run.label for run in sweep), *(label for _, label, _, _ in entries),
                     *(run.label for run in runs if run.policy in ("oracle", "layer ablation"))]
            results += [summarize(by_label[label], length, [*sweep, full_as_uniform], config.bootstrap)
                        for label in order]
    finally:
        if pool is not None:
            pool.shutdown()
    return dict(results=results, chance=chance, config=asdict(config))


def probe_for(probe: ProbeConfig, question: str) -> ProbeConfig:
    """The probe as configured; in question mode, the question is its prompt."""
    if probe.mode != "question":
        return probe
    return ProbeConfig(**{**asdict(probe), "prompts": [question]})


def chance_rows(questions: list[QA]) -> dict:
    """Per family: uniform guessing (mean 1/choices) and always giving the most frequent answer."""
    rows = {"uniform guess": {}, "most frequent answer": {}}
    for family in QUESTION_KINDS:
        asked = [qa for qa in questions if qa.kind == family]
        answers = [qa.answer for qa in asked]
        rows["uniform guess"][family] = 100 * sum(1 / qa.choices for qa in asked) / len(asked)
        rows["most frequent answer"][family] = 100 * max(answers.count(a) for a in set(answers)) / len(answers)
    for row in rows.values():
        row["overall"] = sum(row[f] for f in QUESTION_KINDS) / len(QUESTION_KINDS)  # every family has one question per video
    return rows


def _interval(values) -> str:
    return f"[{values[0]:.1f}, {values[1]:.1f}]" if values is not None else ""


def format_tables(summary: dict) -> str:
    """Per length: every policy's accuracy, interval, memory, paired difference to uniform, answer JS and
    per-family accuracy, then the chance rows."""
    lines = []
    for length in sorted({row["frames"] for row in summary["results"]}):
        rows = [row for row in summary["results"] if row["frames"] == length]
        lines += [f"### {length} frames ({rows[0]['videos']} videos, one question per family each)", "",
                  "| policy | memory | accuracy | 95% interval | vs uniform, same memory | 95% interval | answer JS "
                  "(uniform, same memory) | " + " | ".join(QUESTION_KINDS) + " |",
                  "|---|---:|---:|---|---:|---|---|" + "---:|" * len(QUESTION_KINDS)]
        for row in rows:
            versus = f"{row['vs_uniform']:+.1f}" if row.get("vs_uniform") is not None else ""
            js = f"{row['answer_js']:.4f}"
            if row.get("uniform_answer_js") is not None:
                js += f" ({row['uniform_answer_js']:.4f})"
            families = " | ".join(f"{row['families'][f]:.1f}" for f in QUESTION_KINDS)
            lines.append(f"| {row['label']} | {100 * row['memory_fraction']:.1f}% | {row['accuracy']:.1f} | "
                         f"{_interval(row['accuracy_interval'])} | {versus} | {_interval(row.get('vs_uniform_interval'))}"
                         f" | {js} | {families} |")
        for name, chance in summary["chance"][length].items():
            cells = " | ".join(f"{chance[f]:.1f}" for f in QUESTION_KINDS)
            lines.append(f"| *chance: {name}* | | {chance['overall']:.1f} | | | | | {cells} |")
        lines.append("")
    return "\n".join(lines)


def machine(config: EvalConfig) -> str:
    if resolve_device(config.device).type == "cuda":
        return torch.cuda.get_device_name()
    return (f"{platform.machine()} CPU with {os.cpu_count()} cores, {config.workers} process(es) of {config.threads} "
            "torch thread(s)")


def model_note(name: str) -> str:
    """How the model was trained, from the training record a streamer.builtin.train checkpoint carries."""
    path = checkpoint_directory(name)
    if not (path / "training.json").is_file():
        return ""
    record = json.loads((path / "training.json").read_text())
    first = record
    while first.get("base"):
        first = first["base"]
    return f" The model ({first['parameters'] / 1e6:.2f} M parameters) was trained by {training_note(record)}."


def _stage(s: dict) -> str:
    samples = "text-only samples" if s["max_frames"] == 0 else f"videos of {s['min_frames']}-{s['max_frames']} frames"
    return f"{s['steps']} steps of {s['batch']} {samples}"


def training_note(record: dict) -> str:
    """A training record's stages and time; a fine-tune's after its base's."""
    if "long_stream" in record:  # streamer.builtin.train_long
        c = record["long_stream"]
        note = (f"`python -m streamer.builtin.train_long` on long streams: {c['steps']} steps of a stream of "
                f"{c['videos'][0]}-{c['videos'][1]} videos of 384 frames read through its memory ({c['memory']}, "
                f"budget {c['budget']}, recall {c['recall']})"
                + (f", replaying its own training on {c['replay_videos']} videos at weight {c['replay']}"
                   if c.get("replay") else "") + f" ({record['seconds'] / 60:.0f} min)")
    else:  # streamer.builtin.train
        note = (f"`python -m streamer.builtin.train`: {', '.join(map(_stage, record['config']['stages']))} "
                f"({record['seconds'] / 60:.0f} min)")
    return f"{training_note(record['base'])}; then fine-tuned by {note}" if record.get("base") else note


TASK = """\
Videos from `streamer.builtin.videos`: 84x84 frames, 3x3 cells of 28x28 pixels, each cell of a frame pair one LLM
token (9 per pair; 384 frames are 1728 tokens); a dark background with pixel noise whose shade differs by cell;
3-6 episodes of one object (6 colours x 4 shapes, each pair at most once per video) inside one cell for 2, 4, 8
or 16 frames, or of two such objects in different cells that overlap in time; at least one empty frame pair
between episodes. An event is 1-8 of a 64-frame chunk's 288 tokens. One question of every family per video,
answered from a memory built once per video and policy by streaming it through the runner chunk by chunk:

| family | question | answer |
|---|---|---|
| first | What colour appeared first? | colour (6) |
| where | Where was the {colour} {shape}? | top left, top, ..., bottom right (9) |
| duration | How many frames did the {colour} {shape} stay? | 2, 4, 8, 16 |
| together | What colour was shown with the {colour} {shape}? | colour (6) |
| count | How many times did a {colour} shape appear? | 0-3 |

Columns: memory = memory tokens / full-context tokens (mean over layers and videos, prompt text included);
accuracy in %, exact match of the generated answer, with a 95% bootstrap interval over videos; vs uniform =
accuracy minus uniform pruning's at the same memory on the same videos (uniform is measured at the ratios
listed and interpolated linearly in memory to each row's), in points, with its paired 95% bootstrap
interval; answer JS = Jensen-Shannon divergence (nats) of the first answer token's distribution from the
memory vs from the full context, mean over questions, and in brackets uniform's at the same memory.
oracle keeps exactly the tokens that show an object (the generator knows them) in every layer; oracle + k
also keeps the k best probe-ranked other tokens of each chunk; "layer k alone at r" prunes layer k to r of
each chunk (probe-ranked) and keeps the other layers whole.
"""


def write_markdown(path: Path, summary: dict, config: EvalConfig, command: str) -> None:
    text = [
        "# Synthetic video QA: what each memory keeps of what the questions need", "",
        f"Produced by `{command}` on {date.today().isoformat()}, {machine(config)}, model `{config.model}`, "
        f"chunks of {config.chunk_frames} frames, {config.probe} probe; a plain `emloc` entry: delta {config.delta}, "
        f"ratios {config.ratios}, {config.group_size} layers per group; uniform at {config.uniform_ratios} (and the full "
        f"context as uniform 1.0); pyramid and window at the first emloc row's fraction of video tokens. Held-out videos: seeds "
        f"{config.first_seed}..{config.first_seed + config.videos - 1} (training uses seeds >= 10^6); "
        f"{config.bootstrap} bootstrap resamples." + model_note(config.model), "", TASK,
        format_tables(summary),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else ""
    kept = previous.find("\n## ")  # sections other commands put there (`streamer eval long-stream`) stay
    path.write_text("\n".join(text) + (previous[kept:] if kept >= 0 else ""))
