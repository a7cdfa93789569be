"""Run configuration: TOML files in configs/ with command-line switches on top.

A file may set any subset of the sections and keys below; unknown sections or keys are
refused by name so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from memory.probe import ProbeConfig
from memory.registry import POLICIES, make_policy
from memory.store import check_age_power, check_tier_growth
from video_io.preprocess import VisionPreset, qwen_vl_utils_video, within_total_pixels
from video_io.sampling import SPREADS, Sampling

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class ModelOptions:
    name: str = "builtin"  # a built-in model (builtin, tiny-random, ...) or a local checkpoint directory
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    cuda_graphs: bool = True  # on a GPU, answers and probes replay CUDA graphs (streamer.engine.decode, static_batch)


@dataclass
class VideoOptions:
    frames: int | None = 32  # uniform sampling over the whole video ...
    spread: str = "centres"  # ... at the centres of N equal segments, or "linspace": first to last frame inclusive
    fps: float | None = None  # ... or frames per second of video time (then leave frames out)
    max_frames: int | None = None  # cap for fps sampling
    backend: str = "pyav"  # pyav | decord
    min_pixels: int | None = None  # per frame after smart resize; None: the checkpoint's own (preset.json, else
    max_pixels: int | None = None  # its preprocessor config), else its family's defaults (Qwen2-VL 128..768*28*28)
    # pixels of the whole video, shared by its frames as qwen-vl-utils shares them (a file's frame count must
    # be known: not for live streams); "qwen-vl-utils": its defaults, 128000*28*28*0.9 over frames of
    # 128..768*28*28 pixels (32 for Qwen3-VL); None: no budget
    total_pixels: int | str | None = None

    def sampling(self) -> Sampling:
        """Which frames of a file to read, as configured."""
        return Sampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames, spread=self.spread)


@dataclass
class MemoryOptions:
    policy: str = "full"  # full | emloc | uniform | pyramid | window | recent | random; options in [emloc], [uniform], ...
    chunk_frames: int = 16  # frames per prefill chunk; a multiple of 2 (frames are encoded in pairs)
    budget: int = 0  # tokens per layer on average the memory may hold (all layers together: budget x layers); 0 = unbounded
    # under a budget, a chunk of age a (in chunks) keeps about c / a^age_power of what its policy kept (docs/MEMORY.md)
    age_power: float = 1.0
    # most positions a stream spans before its past is re-timed onto fewer (0: the model's max_position_embeddings)
    max_positions: int = 0
    # under a budget: > 0 keeps evicted tokens on the host, and a question brings back up to this many per layer on
    # average, of the chunks it attends to most (streamer/engine/recall.py); 0: evicted tokens are gone
    recall: int = 0
    # with recall: tokens per layer on average the host may keep, thinned by rank x age beyond it (0: unbounded)
    host_budget: int = 0
    # > 0: tiered compaction: under the budget a chunk of age a first gives up what its EMLoC search dropped at a JS
    # of up to a^tier_growth times the bound (memory.store eviction_keys; docs/MEMORY.md); 0: rank x age alone
    tier_growth: float = 0.0
    # > 0: a question reads only the chunks it attends to most, device and host alike, up to this many tokens per
    # layer on average (streamer/engine/recall.py; docs/MEMORY.md); 0: the whole memory
    focus: int = 0

    def limits(self) -> dict:
        """The keyword arguments of Runner.new_memory: what bounds a memory and how it evicts."""
        return dict(budget=self.budget or None, age_power=float(self.age_power), max_positions=self.max_positions or None,
                    recall=int(self.recall), host_budget=self.host_budget or None,
                    tier_growth=float(self.tier_growth), focus=int(self.focus))


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    repetition_penalty: float | None = None  # None: the checkpoint's generation_config.json's, else 1.0


@dataclass
class Config:
    model: ModelOptions = field(default_factory=ModelOptions)
    video: VideoOptions = field(default_factory=VideoOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    policies: dict[str, dict] = field(default_factory=dict)  # per-policy options: {"emloc": {"delta": ...}}

    def make_policy(self, question: str | None = None):
        """The configured memory policy; in question-probe mode, `question` is the probe."""
        probe = self.probe
        if probe.mode == "question":
            if question is None:
                raise ValueError("probe mode 'question' needs the question before the video; use mode 'generic'")
            probe = replace(probe, prompts=[question])
        return make_policy(self.memory.policy, self.policies.get(self.memory.policy), probe)

    def vision_preset(self, model_preset: VisionPreset | None) -> VisionPreset:
        """The frame resolution: the configured pixel range over the model's own (or, given None, Qwen2-VL's
        processor defaults)."""
        preset = model_preset or VisionPreset()
        if self.video.total_pixels == "qwen-vl-utils":
            preset = qwen_vl_utils_video(preset)[0]
        given = {k: v for k, v in (("min_pixels", self.video.min_pixels), ("max_pixels", self.video.max_pixels))
                 if v is not None}
        preset = replace(preset, **given)
        if preset.min_pixels > preset.max_pixels:
            raise ValueError(f"min_pixels {preset.min_pixels} is above max_pixels {preset.max_pixels}; set both")
        return preset

    def video_preset(self, preset: VisionPreset, frames: int) -> VisionPreset:
        """`preset` for a video of `frames` sampled frames: within video.total_pixels when set."""
        budget = self.video.total_pixels
        if budget is None:
            return preset
        return within_total_pixels(preset, qwen_vl_utils_video(preset)[1] if budget == "qwen-vl-utils" else budget,
                                   frames)

    def validate(self) -> "Config":
        video, mem = self.video, self.memory
        if not isinstance(self.model.cuda_graphs, bool):
            raise ValueError(f"model.cuda_graphs must be true or false (--no-cuda-graphs), got {self.model.cuda_graphs!r}")
        if (video.frames is None) == (video.fps is None):
            raise ValueError("set exactly one of video.frames (--frames) and video.fps (--fps)")
        if video.frames is not None and video.frames < 1:
            raise ValueError(f"video.frames (--frames) must be >= 1, got {video.frames}")
        if video.fps is not None and not (video.fps > 0 and math.isfinite(video.fps)):
            raise ValueError(f"video.fps (--fps) must be a finite number > 0, got {video.fps}")
        if video.spread not in SPREADS:
            raise ValueError(f"video.spread (--spread) must be one of {', '.join(SPREADS)}, got {video.spread!r}")
        if video.backend not in ("pyav", "decord"):
            raise ValueError(f"video.backend (--backend) must be pyav or decord, got {video.backend!r}")
        if any(p is not None and p <= 0 for p in (video.min_pixels, video.max_pixels)) or (
                None not in (video.min_pixels, video.max_pixels) and video.min_pixels > video.max_pixels):
            raise ValueError(f"need 0 < video.min_pixels (--min-pixels) <= video.max_pixels (--max-pixels), got {video.min_pixels}, {video.max_pixels}")
        budget = video.total_pixels
        if budget is not None and budget != "qwen-vl-utils" and (isinstance(budget, (str, bool)) or budget < 1):
            raise ValueError(f"video.total_pixels (--total-pixels) must be a pixel count >= 1 or 'qwen-vl-utils', got {budget!r}")
        if mem.chunk_frames < 2 or mem.chunk_frames % 2:
            raise ValueError(
                f"memory.chunk_frames (--chunk-frames) must be a positive multiple of 2, got {mem.chunk_frames}: "
                "Qwen2-VL encodes frames in pairs"
            )
        if mem.budget < 0:
            raise ValueError(f"memory.budget (--budget) must be >= 0 (0 = unbounded), got {mem.budget}")
        if isinstance(mem.age_power, bool) or not isinstance(mem.age_power, (int, float)):
            raise ValueError(f"memory.age_power must be a number, got {mem.age_power!r}")
        check_age_power(mem.age_power)
        if isinstance(mem.tier_growth, bool) or not isinstance(mem.tier_growth, (int, float)):
            raise ValueError(f"memory.tier_growth must be a number (0 = off), got {mem.tier_growth!r}")
        check_tier_growth(mem.tier_growth)
        if mem.max_positions < 0:
            raise ValueError(f"memory.max_positions must be >= 0 (0 = the model's), got {mem.max_positions}")
        if isinstance(mem.host_budget, bool) or not isinstance(mem.host_budget, int) or mem.host_budget < 0:
            raise ValueError(f"memory.host_budget must be a token count >= 0 (0 = unbounded), got {mem.host_budget!r}")
        if isinstance(mem.focus, bool) or not isinstance(mem.focus, int) or mem.focus < 0:
            raise ValueError(f"memory.focus must be a token count >= 0 (0 = a question reads it all), got {mem.focus!r}")
        if isinstance(mem.recall, bool) or not isinstance(mem.recall, int) or mem.recall < 0:
            raise ValueError(f"memory.recall must be a token count >= 0 (0 = evicted tokens are gone), got {mem.recall!r}")
        self.probe.validate()
        self.make_policy(question="?")  # checks the policy name and its options
        if self.generation.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens (--max-new-tokens) must be >= 1, got {self.generation.max_new_tokens}")
        penalty = self.generation.repetition_penalty
        if penalty is not None and not (penalty > 0 and math.isfinite(penalty)):
            raise ValueError(f"generation.repetition_penalty (--repetition-penalty) must be a finite number > 0, got {penalty}")
        return self


def find_config(name: str) -> Path:
    """A path as given, or a file in configs/ (with or without .toml)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.toml")))
    raise FileNotFoundError(f"no config file {name!r} (looked in the current directory and {CONFIG_DIR}; known: {known})")


def load_config(name: str | None = None) -> Config:
    config = Config()
    if name is None:
        return config
    path = find_config(name)
    with path.open("rb") as f:
        data = tomllib.load(f)
    sections = [f.name for f in fields(Config) if f.name != "policies"]
    for section, values in data.items():
        if not isinstance(values, dict) or section not in [*sections, *POLICIES]:
            raise ValueError(f"{path}: unknown section [{section}]; known: {', '.join([*sections, *POLICIES])}")
        if section in POLICIES:
            make_policy(section, values)  # refuses unknown keys by name
            config.policies[section] = dict(values)
            continue
        current = getattr(config, section)
        known = {f.name for f in fields(current)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in [{section}]; known: {sorted(known)}")
        if section == "video" and "fps" in values and "frames" not in values:
            values = {**values, "frames": None}  # fps sampling replaces the default frame count
        setattr(config, section, replace(current, **values))
    return config


def override(config: Config, section: str, **values) -> Config:
    """Set the given keys of one section (or policy's options), skipping those left as None."""
    given = {k: v for k, v in values.items() if v is not None}
    if section in POLICIES:
        config.policies[section] = {**config.policies.get(section, {}), **given}
    elif given:
        setattr(config, section, replace(getattr(config, section), **given))
    return config
