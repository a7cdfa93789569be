"""Model loading: local Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense or MoE) checkpoints and built-in models.

Nothing here downloads anything. A real checkpoint is a local directory; the built-in
models ship with the package or are built from a config with seeded random weights:

- ``builtin``: a small Qwen2-VL trained here on procedural videos (streamer.builtin.train), shipped in
  streamer/assets/builtin with the vision preset it was trained at; it really answers questions
  about streamer.builtin.videos videos, so the memory's effect on answers can be measured offline.
- ``builtin-choice``: that model fine-tuned (configs/train/builtin_tune.toml) to answer the
  benchmarks' multiple-choice prompts with a letter too, for OVO-Bench and StreamingBench runs on
  generated sets (`streamer make-sets`); under a pruned memory it keeps less than ``builtin``.
- ``tiny-random`` / ``tiny-random-qwen2.5-vl`` / ``tiny-random-qwen3-vl``: a few-layer model of each family
  with the project's small tokenizer, for exactness tests.
- ``qwen2-vl-{2b,7b,72b}-random``, ``qwen2.5-vl-{3b,7b,72b}-random``, ``qwen3-vl-{2b,4b,8b,32b}-random``: the
  real architectures (configs/models/*.json) with random weights, for speed measurement.

The family (FAMILIES) comes from a config's model_type, so a checkpoint of any of them loads by path.

A checkpoint directory's own settings are honoured as transformers would honour them: the dtype
of its config.json, the frame resolution of its (video_)preprocessor_config.json, the stop tokens
and repetition penalty of its generation_config.json, and the prompt layout of its chat template
(streamer.engine.prompt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import (AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

from streamer.engine.attention import MEMORY_ATTENTION, register_memory_attention
from video_io.preprocess import QWEN3_PRESET, VisionPreset

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_TOKENIZER = ASSETS / "tiny-tokenizer"
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
BUILTIN = "builtin"
BUILTIN_CHOICE = "builtin-choice"
# checkpoint directories like any other, trained by streamer.builtin.train
TRAINED_MODELS = {BUILTIN: ASSETS / "builtin", BUILTIN_CHOICE: ASSETS / "builtin-choice"}
PRESET_FILE = "preset.json"  # optional in a checkpoint: VisionPreset fields (the resolution it was trained at)
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")  # transformers' order
TINY_RANDOM = "tiny-random"
TINY_RANDOM_QWEN25 = "tiny-random-qwen2.5-vl"
TINY_RANDOM_QWEN3 = "tiny-random-qwen3-vl"
RANDOM_ARCHITECTURES = {f"{family}-{size}-random": f"{family}-{size}.json"
                        for family, sizes in (("qwen2-vl", ("2b", "7b", "72b")), ("qwen2.5-vl", ("3b", "7b", "72b")),
                                              ("qwen3-vl", ("2b", "4b", "8b", "32b")))
                        for size in sizes}
# seeded random weights: no meaningful answers
RANDOM_MODELS = (TINY_RANDOM, TINY_RANDOM_QWEN25, TINY_RANDOM_QWEN3, *RANDOM_ARCHITECTURES)
BUILTIN_MODELS = (*TRAINED_MODELS, *RANDOM_MODELS)
RANDOM_SEED = 0

# Small enough for 2 CPU cores, but with the features that matter: grouped KV heads
# (4 query heads per 2 KV heads), 3-D M-RoPE, a 2-block vision tower with the 2x2 merger,
# and 6 layers so that layer groups of 4 do not divide the depth.
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    initializer_range=0.1,
)
TINY_VISION = dict(
    depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu", hidden_size=64,
    initializer_range=0.1,
)
# Qwen2.5-VL's tower: windows of 2 x 2 merged tokens (56 pixels), so that a test frame holds several,
# some cut by the frame's edge, and one full-attention block between window blocks.
TINY_VISION_QWEN25 = dict(
    depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", out_hidden_size=64,
    window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=0.1,
)
# Qwen3-VL's tower: patch 16, a 4 x 4 table of learned position embeddings (resampled to a test frame's 4 x 8
# patches), and DeepStack features from two blocks, added after decoder layers 0 and 1.
TINY_VISION_QWEN3 = dict(
    depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh", out_hidden_size=64,
    num_position_embeddings=16, deepstack_visual_indexes=[0, 2], initializer_range=0.1,
)


@dataclass(frozen=True)
class VisionShape:
    """A vision tower's sizes and block kinds, named alike for every family (their configs name them each their
    own way): what the tower code (streamer.engine.vision), the FLOP counts and a snapshot's identity read."""

    width: int  # a block's hidden size
    out: int  # the merger's output: the text model's hidden size
    mlp: int  # a block's MLP inner size
    gated: bool  # a gated MLP (three matrices) rather than a plain one (two)
    full_blocks: tuple[int, ...]  # blocks attending over the whole frame pair; the others attend within windows
    window: int | None  # a window's side in patches (None: no block is windowed)
    deepstack: tuple[int, ...] = ()  # blocks whose features also feed the text model's first layers
    learned_positions: bool = False  # a learned position table added to the patches, besides the rotary ones


def qwen2_vl_vision(c: PretrainedConfig) -> VisionShape:
    return VisionShape(c.embed_dim, c.hidden_size, int(c.embed_dim * c.mlp_ratio), gated=False,
                       full_blocks=tuple(range(c.depth)), window=None)


def qwen2_5_vl_vision(c: PretrainedConfig) -> VisionShape:  # window attention but in fullatt_block_indexes
    return VisionShape(c.hidden_size, c.out_hidden_size, c.intermediate_size, gated=True,
                       full_blocks=tuple(c.fullatt_block_indexes), window=c.window_size // c.patch_size)


def qwen3_vl_vision(c: PretrainedConfig) -> VisionShape:  # DeepStack: features of a few blocks go to the LLM
    return VisionShape(c.hidden_size, c.out_hidden_size, c.intermediate_size, gated=False,
                       full_blocks=tuple(range(c.depth)), window=None, deepstack=tuple(c.deepstack_visual_indexes),
                       learned_positions=True)


@dataclass(frozen=True)
class Family:
    """Everything that differs between the model families, in one row (docs/DESIGN.md, "Add a model family")."""

    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
    vision: Callable[[PretrainedConfig], VisionShape]  # the tower's shape from its vision_config
    preset: VisionPreset = VisionPreset()  # the processor's defaults: patch size, pixel range, normalisation
    # Qwen3-VL: every frame pair is a vision block of its own after a text timestamp (docs/DESIGN.md section 4)
    timestamps: bool = False
    # whether a processor config's pixel bounds are per frame; Qwen3-VL's bound a whole clip (frames x pixels),
    # which a stream cannot share out, so its frames keep the family's per-frame bounds
    frame_pixels: bool = True
    # Qwen2.5-VL: temporal positions count seconds (tokens_per_second), not frame pairs
    absolute_time: bool = False

    def pair_step(self, vision_config: PretrainedConfig, fps: float) -> float:
        """Temporal M-RoPE positions per frame pair in an open vision block (docs/DESIGN.md section 4): 1, or
        with absolute time tokens_per_second x the seconds a pair spans (temporal_patch_size / fps), the
        seconds in float32 as transformers' processor hands them over (second_per_grid_ts)."""
        if not self.absolute_time:
            return 1.0
        return vision_config.tokens_per_second * float(torch.tensor(vision_config.temporal_patch_size / fps))


# by the model_type of a checkpoint's config.json
FAMILIES = {"qwen2_vl": Family(Qwen2VLConfig, Qwen2VLForConditionalGeneration, qwen2_vl_vision),
            "qwen2_5_vl": Family(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_vision,
                                 absolute_time=True),
            "qwen3_vl": Family(Qwen3VLConfig, Qwen3VLForConditionalGeneration, qwen3_vl_vision, QWEN3_PRESET,
                               timestamps=True, frame_pixels=False),
            # Qwen3-VL's MoE checkpoints: the same tower, layout and positions; the decoder layers' MLPs are experts
            "qwen3_vl_moe": Family(Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, qwen3_vl_vision,
                                   QWEN3_PRESET, timestamps=True, frame_pixels=False)}


@dataclass
class LoadedModel:
    model: PreTrainedModel  # a FAMILIES model
    tokenizer: PreTrainedTokenizerBase
    name: str  # a built-in name, or the checkpoint's absolute path (what loads it from any directory)
    preset: VisionPreset | None = None  # the frame resolution: the checkpoint's, else its family's defaults
    generation: GenerationConfig | None = None  # the checkpoint's generation_config.json, when it has one

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return torch.device(device)


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | None, device: torch.device, checkpoint: Path | None = None) -> torch.dtype:
    """`dtype` by name; auto: the checkpoint's own (config.json), else bfloat16 on CUDA, float32 on CPU."""
    if dtype in (None, "auto"):
        own = checkpoint_dtype(checkpoint) if checkpoint is not None else None
        return own or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json states (`dtype`, or `torch_dtype` as older releases write it)."""
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return DTYPE_NAMES.get(name) if isinstance(name, str) else None


def processor_preset(path: Path, known: Family) -> VisionPreset | None:
    """The frame resolution and normalisation of a checkpoint's video (or image) preprocessor config over its
    family's defaults, as transformers' video processor loaded from the same directory uses them (the pixel
    bounds only where they are per frame); None without such a file."""
    for name in PROCESSOR_FILES:
        if (path / name).is_file():
            config = json.loads((path / name).read_text())
            break
    else:
        return None
    size = config.get("size") or {}
    pixels = dict(min_pixels=config.get("min_pixels", size.get("shortest_edge")),
                  max_pixels=config.get("max_pixels", size.get("longest_edge")),
                  patch_size=config.get("patch_size"), temporal_patch_size=config.get("temporal_patch_size"),
                  merge_size=config.get("merge_size"))
    if not known.frame_pixels:
        del pixels["min_pixels"], pixels["max_pixels"]
    given = {k: int(v) for k, v in pixels.items() if v is not None}
    given.update({field: tuple(config[key]) for field, key in (("mean", "image_mean"), ("std", "image_std"))
                  if key in config})
    return replace(known.preset, **given)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def family(model_type: str | None, where: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported family ({', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def family_of(model: PreTrainedModel) -> Family:
    return FAMILIES[model.config.model_type]


HASHED_VALUES = 4096  # per hashed parameter: enough to tell random inits apart, cheap even for 72B


def model_identity(model, name: str) -> dict:
    """What a snapshot of this model's memory must match (memory.snapshot): the architecture and a sha256 over a
    few weights.

    `weights` is None for a model on the meta device (no values to hash); such an identity is
    checked on architecture only.
    """
    text, vision = model.config.text_config, model.config.vision_config
    shape = family_of(model).vision(vision)
    architecture = dict(
        model_type=model.config.model_type, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads, hidden_size=text.hidden_size, vocab_size=text.vocab_size,
        rope_theta=text.rope_parameters["rope_theta"], mrope_section=list(text.rope_parameters["mrope_section"]),
        vision_depth=vision.depth, vision_embed_dim=shape.width, vision_hidden_size=shape.out,
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size,
    )
    lm = model.model.language_model
    params = [lm.embed_tokens.weight, lm.norm.weight, model.lm_head.weight, model.model.visual.patch_embed.proj.weight]
    weights = None
    if not any(p.is_meta for p in params):
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().reshape(-1)[:HASHED_VALUES].to("cpu", torch.float32).numpy().tobytes())
        weights = digest.hexdigest()
    return dict(name=name, architecture=architecture, weights=weights)


def builtin_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """Config of a built-in model, with special-token ids taken from `tokenizer`."""
    specials = special_token_ids(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Qwen3-VL's text config states head_dim (default 128); the others derive it from the widths
    qwen3_text = dict(head_dim=TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"])
    tiny = {TINY_RANDOM: (Qwen2VLConfig, TINY_VISION, {}),
            TINY_RANDOM_QWEN25: (Qwen2_5_VLConfig, TINY_VISION_QWEN25, {}),
            TINY_RANDOM_QWEN3: (Qwen3VLConfig, TINY_VISION_QWEN3, qwen3_text)}
    if name in tiny:
        config, vision, own_text = tiny[name]
        text = dict(TINY_TEXT, **own_text, vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=bos)
        return config(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **specials)
    if name in RANDOM_ARCHITECTURES:
        path = MODEL_CONFIGS / RANDOM_ARCHITECTURES[name]
        spec = json.loads(path.read_text())
        spec.pop("_comment", None)
        config = family(spec.pop("model_type", None), str(path)).config
        spec["text_config"].update(eos_token_id=eos, bos_token_id=bos)
        return config(**spec, **specials)
    raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")


def build_random_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                       seed: int = RANDOM_SEED) -> PreTrainedModel:
    """Seeded random weights: the same seed gives the same model on every machine."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = family(config.model_type, "built-in config").model._from_config(config, dtype=dtype)
    return model.eval()


def checkpoint_directory(name_or_path: str) -> Path:
    """Where a trained built-in model or a checkpoint given by path lives."""
    return TRAINED_MODELS.get(name_or_path) or Path(name_or_path).expanduser()


def load_model(name_or_path: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a built-in model by name or a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint from a local directory."""
    register_memory_attention()
    torch_device = resolve_device(device)
    preset = generation = None
    if name_or_path in RANDOM_MODELS:
        tokenizer = tiny_tokenizer()
        torch_dtype = resolve_dtype(dtype, torch_device)
        model = build_random_model(builtin_config(name_or_path, tokenizer), torch_device, torch_dtype)
    else:
        path = checkpoint_directory(name_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint at {str(path)!r} (expected a directory with "
                f"config.json and *.safetensors). Give a local checkpoint directory or a built-in model: "
                f"{', '.join(BUILTIN_MODELS)}"
            )
        torch_dtype = resolve_dtype(dtype, torch_device, path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        known = family(model_type, str(path / "config.json"))
        model = known.model.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        model = model.to(torch_device).eval()
        if (path / PRESET_FILE).is_file():
            preset = VisionPreset(**json.loads((path / PRESET_FILE).read_text()))
        else:
            preset = processor_preset(path, known)
        if (path / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    # Only the language model uses the memory-aware attention; the vision tower keeps its default.
    model.set_attn_implementation({"text_config": MEMORY_ATTENTION})
    name = name_or_path if name_or_path in BUILTIN_MODELS else str(path.resolve())
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, preset=preset, generation=generation)
