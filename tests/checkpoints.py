"""Checkpoint directories laid out like the published Qwen2-VL-*-Instruct repositories (config.json,
tokenizer with its chat template, generation_config.json, preprocessor_config.json, bfloat16
safetensors), with a tiny random model of any family and the project's small tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamer.engine.models import build_random_model, builtin_config, tiny_tokenizer
from video_io.preprocess import CLIP_MEAN, CLIP_STD, HALF

# tokenizer_config.json's chat_template in Qwen/Qwen2-VL-{2B,7B}-Instruct
INSTRUCT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen2-VL-7B-Instruct's generation_config.json (token ids: the small tokenizer's)
INSTRUCT_GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1)
# its preprocessor_config.json
PREPROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), image_processor_type="Qwen2VLImageProcessor",
                    processor_class="Qwen2VLProcessor")
# Qwen/Qwen3-VL-*-Instruct's preprocessor_config.json (its pixel bounds are transformers' per image)
QWEN3_PREPROCESSOR = dict(size=dict(shortest_edge=65536, longest_edge=16777216), patch_size=16, temporal_patch_size=2,
                          merge_size=2, image_mean=list(HALF), image_std=list(HALF),
                          image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")


def published_checkpoint(path: Path, template: str | None = INSTRUCT_TEMPLATE, generation: dict | None = None,
                         preprocessor: dict | None = None, model_name: str = "tiny-random") -> Path:
    """Write a checkpoint of the built-in `model_name` at `path`; `generation` / `preprocessor` replace the
    published files' values (None: the published ones)."""
    tokenizer = tiny_tokenizer()
    model = build_random_model(builtin_config(model_name, tokenizer), torch.device("cpu"), torch.bfloat16)
    model.save_pretrained(path)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    end, text_end = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=text_end, pad_token_id=text_end, eos_token_id=[end, text_end])
    (path / "generation_config.json").write_text(json.dumps({**ids, **(generation or INSTRUCT_GENERATION)}))
    published = QWEN3_PREPROCESSOR if model.config.model_type == "qwen3_vl" else PREPROCESSOR
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor or published))
    return path
