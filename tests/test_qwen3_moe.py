"""Qwen3-VL's MoE family (qwen3_vl_moe) loads by path and streams exactly: a tiny checkpoint of it (experts in
every decoder layer) against one stock transformers forward over the whole video."""

import pytest
import torch
from conftest import FAMILY_FPS, family_test_preset, question_logits, random_frames, stream
from reference import one_shot_logits
from transformers import Qwen3VLMoeConfig

from streamer.engine.models import (TINY_TEXT, TINY_VISION_QWEN3, build_random_model, load_model, special_token_ids,
                                    tiny_tokenizer)
from streamer.engine.runner import Runner

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def moe_runner(tmp_path_factory) -> Runner:
    tokenizer = tiny_tokenizer()
    text = dict(TINY_TEXT, head_dim=16, vocab_size=len(tokenizer), num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32)
    config = Qwen3VLMoeConfig(text_config=text, vision_config=dict(TINY_VISION_QWEN3), **special_token_ids(tokenizer))
    path = tmp_path_factory.mktemp("moe")
    build_random_model(config, torch.device("cpu"), torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.model.config.model_type == "qwen3_vl_moe"
    return Runner(loaded, preset=family_test_preset(loaded.model))


@pytest.mark.parametrize("frame_count, chunk_frames", [(12, 4), (11, 4), (12, 10000)])
def test_moe_chunked_logits_equal_one_shot(moe_runner, frame_count, chunk_frames):
    frames = random_frames(frame_count)
    memory = stream(moe_runner, frames, chunk_frames, fps=FAMILY_FPS)
    torch.testing.assert_close(question_logits(moe_runner, memory, QUESTION),
                               one_shot_logits(moe_runner, frames, QUESTION, fps=FAMILY_FPS), atol=1e-5, rtol=0)
