"""A real checkpoint's own settings (issue 16): dtype, frame resolution, generation settings and chat
template, on directories laid out like the published Qwen2-VL-Instruct repositories."""

import json

import numpy as np
import pytest
import torch
from checkpoints import PREPROCESSOR, published_checkpoint
from conftest import FAMILY_MODELS, TEST_PRESET, random_frames, stream
from reference import one_video_inputs, one_shot_logits
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from streamer.config import Config, override
from streamer.engine.models import load_model
from streamer.engine.prompt import SYSTEM_PROMPT, question_suffix, video_prefix
from streamer.engine.runner import Runner, load_runner
from streamer.service.protocol import ServerLimits
from streamer.service.service import StreamService
from video_io.preprocess import (QWEN_VL_UTILS_PRESET, QWEN_VL_UTILS_TOTAL_PIXELS, VisionPreset, smart_resize,
                                 within_total_pixels)

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def checkpoint(request, tmp_path_factory):
    """A checkpoint directory of each family, recognised by its config.json's model_type."""
    return published_checkpoint(tmp_path_factory.mktemp("Instruct"), model_name=request.param)


def tokens_per_pair(preset: VisionPreset, height: int, width: int) -> int:
    h, w = smart_resize(height, width, 28, preset.min_pixels, preset.max_pixels)
    return (h // 28) * (w // 28)


def test_a_checkpoint_loads_in_its_own_dtype_unless_told(checkpoint):
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(str(checkpoint), device="cpu").dtype == torch.bfloat16  # was float32 on CPU
    assert load_model(str(checkpoint), device="cpu", dtype="float32").dtype == torch.float32


def test_frame_resolution_follows_the_preprocessor_config(checkpoint, tmp_path):
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    assert (loaded.preset.min_pixels, loaded.preset.max_pixels) == (3136, 12845056)
    runner = Runner(loaded)
    assert tokens_per_pair(runner.preset, 720, 1280) == 1196  # transformers' processor: 1196; we had 720
    configured = override(Config(), "video", max_pixels=144 * 28 * 28)
    assert configured.vision_preset(loaded.preset).max_pixels == 144 * 28 * 28  # switches still win
    # a video_preprocessor_config.json (transformers 5's layout) comes before preprocessor_config.json
    other = published_checkpoint(tmp_path / "video")
    (other / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 256 * 28 * 28}, "patch_size": 14}))
    preset = load_model(str(other), device="cpu").preset
    assert (preset.min_pixels, preset.max_pixels) == (128 * 28 * 28, 256 * 28 * 28)
    odd = published_checkpoint(tmp_path / "odd", preprocessor={**PREPROCESSOR, "image_mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean"):
        load_model(str(odd), device="cpu")


def test_transformers_video_processor_from_the_checkpoint_agrees(checkpoint):
    pytest.importorskip("torchvision", reason="transformers' video processor needs torchvision")
    from transformers import AutoVideoProcessor
    processor = AutoVideoProcessor.from_pretrained(checkpoint)
    frames = torch.from_numpy(np.stack(random_frames(2, size=(720, 1280))))
    grid = processor(videos=[frames.permute(0, 3, 1, 2)], return_tensors="pt")["video_grid_thw"][0].tolist()
    preset = load_model(str(checkpoint), device="cpu").preset
    assert grid[1] * grid[2] // 4 == tokens_per_pair(preset, 720, 1280)


def test_the_qwen_vl_utils_budget_shares_pixels_among_frames():
    # qwen-vl-utils on 720p: 576 tokens per frame pair at 384 frames, 276 at 768 (measured, issue 16); at 32
    # frames the per-frame cap of 768 x 28 x 28 pixels binds (720 tokens)
    for frames, tokens in ((384, 576), (768, 276), (32, 720)):
        preset = within_total_pixels(QWEN_VL_UTILS_PRESET, QWEN_VL_UTILS_TOTAL_PIXELS, frames)
        assert tokens_per_pair(preset, 720, 1280) == tokens
    config = override(Config(), "video", total_pixels="qwen-vl-utils").validate()
    preset = config.video_preset(config.vision_preset(None), 384)
    assert tokens_per_pair(preset, 720, 1280) == 576
    assert Config().video_preset(VisionPreset(), 384) == VisionPreset()  # no budget: unchanged
    with pytest.raises(ValueError, match="total_pixels"):
        override(Config(), "video", total_pixels="lots").validate()


def test_the_server_refuses_a_whole_video_pixel_budget(tiny_runner):
    config = override(Config(), "video", total_pixels=10**8)
    with pytest.raises(ValueError, match="live stream"):
        StreamService(tiny_runner, config, ServerLimits())


def test_generation_settings_come_from_the_checkpoint(checkpoint):
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    runner = Runner(loaded, preset=TEST_PRESET)
    ids = runner.tokenizer.convert_tokens_to_ids
    assert runner.stop_ids == {ids("<|im_end|>"), ids("<|endoftext|>")}
    assert runner.repetition_penalty == 1.05
    assert Runner(loaded, preset=TEST_PRESET, repetition_penalty=1.0).repetition_penalty == 1.0
    config = override(Config(), "model", name=str(checkpoint), device="cpu")
    override(config, "generation", repetition_penalty=1.2)
    assert load_runner(config)[0].repetition_penalty == 1.2
    assert Runner(load_model("tiny-random", device="cpu")).repetition_penalty == 1.0  # no generation config


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_repetition_penalty_answers_as_transformers_generate(tiny_runner, penalty):
    """Greedy with transformers' own RepetitionPenaltyLogitsProcessor over the whole prompt and answer,
    each step recomputed from scratch, gives the runner's answer."""
    runner = Runner(load_model("tiny-random", device="cpu", dtype="float32"), preset=TEST_PRESET,
                    repetition_penalty=penalty)
    frames = random_frames(6, seed=3)
    answer = runner.answer(stream(runner, frames, 2), QUESTION, max_new_tokens=12)
    ids, _, _, _ = one_video_inputs(runner, frames, QUESTION)
    processor, tokens = RepetitionPenaltyLogitsProcessor(penalty), []
    for _ in range(12):
        logits = one_shot_logits(runner, frames, QUESTION, tokens)[-1:]
        token = int(processor(torch.tensor([ids + tokens]), logits).argmax())
        if token in runner.stop_ids:
            break
        tokens.append(token)
    assert answer.token_ids == tokens
    if penalty != 1.0:  # the penalty changed the answer, so the comparison above means something
        assert tokens != runner_without_penalty_tokens(frames)


def runner_without_penalty_tokens(frames) -> list[int]:
    runner = Runner(load_model("tiny-random", device="cpu", dtype="float32"), preset=TEST_PRESET)
    return runner.answer(stream(runner, frames, 2), QUESTION, max_new_tokens=12).token_ids


def test_the_prompt_is_laid_out_by_the_checkpoint_chat_template(checkpoint, tmp_path):
    runner = Runner(load_model(str(checkpoint), device="cpu"), preset=TEST_PRESET)
    assert runner.layout.source == "chat template"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    expected = runner.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert runner.layout.prefix + "<|video_pad|>" + runner.layout.question_suffix(QUESTION) == expected
    assert runner.layout.prefix == video_prefix(SYSTEM_PROMPT)  # the Instruct template is the built-in layout
    assert runner.layout.question_suffix(QUESTION) == question_suffix(QUESTION)
    # another layout (a base-model style template) is followed, not overridden
    plain = "{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}{% if c['type'] == " \
            "'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}Q: {{ c['text'] }}{% endif %}{% endfor " \
            "%}{% endif %}{% endfor %} A:"
    base = Runner(load_model(str(published_checkpoint(tmp_path / "base", template=plain)), device="cpu"),
                  preset=TEST_PRESET)
    assert base.layout.prefix == "<|vision_start|>" and base.layout.question_suffix("Why?") == "<|vision_end|>Q: Why? A:"
    memory = stream(base, random_frames(2), 2)
    assert memory.layers[0].positions.shape[-2] == len(base.prefix_ids) + 8
    broken = published_checkpoint(tmp_path / "broken", template="{{ messages[0]['content'][0]['text'] }}")
    with pytest.raises(ValueError, match="chat template"):
        Runner(load_model(str(broken), device="cpu"), preset=TEST_PRESET)
