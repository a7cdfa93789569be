"""A real checkpoint's own settings (issue 16): dtype, frame resolution, generation settings and chat
template, on directories laid out like the published Qwen2-VL-Instruct repositories."""

import json

import numpy as np
import pytest
import torch
from checkpoints import PREPROCESSOR, published_checkpoint
from conftest import FAMILY_MODELS, TEST_PRESET, family_test_preset, random_frames, stream
from reference import one_video_inputs, one_shot_logits
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from streamer.config import Config, override
from streamer.engine.models import family_of, load_model
from streamer.engine.prompt import SYSTEM_PROMPT, question_suffix, video_prefix
from streamer.engine.runner import Runner, load_runner
from streamer.service.protocol import ServerLimits
from streamer.service.service import StreamService
from video_io.preprocess import (QWEN3_PRESET, VisionPreset, qwen_vl_utils_video, smart_resize,
                                 within_total_pixels)

QUESTION = "What happens in the video?"
MODEL_OF = {"qwen2_vl": "tiny-random", "qwen2_5_vl": "tiny-random-qwen2.5-vl", "qwen3_vl": "tiny-random-qwen3-vl"}


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


def test_frame_resolution_follows_the_preprocessor_config(tmp_path):
    checkpoint = published_checkpoint(tmp_path / "Instruct")
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
    assert load_model(str(odd), device="cpu").preset.mean == (0.5, 0.5, 0.5)  # normalised as the file says


def test_a_qwen3_checkpoint_brings_its_patch_size_and_normalisation(tmp_path):
    path = published_checkpoint(tmp_path / "Instruct", model_name="tiny-random-qwen3-vl")
    loaded = load_model(str(path), device="cpu")
    preset = loaded.preset
    assert (preset.patch_size, preset.merge_size, preset.mean, preset.std) == (16, 2, (0.5,) * 3, (0.5,) * 3)
    # its processor's pixel bounds are a whole clip's: frames keep the family's per-frame bounds (qwen-vl-utils')
    assert preset == QWEN3_PRESET and Runner(loaded).preset == preset
    (tmp_path / "Instruct" / "preprocessor_config.json").unlink()  # without one: the family's defaults
    assert Runner(load_model(str(tmp_path / "Instruct"), device="cpu")).preset == QWEN3_PRESET


def test_transformers_video_processor_from_the_checkpoint_agrees(checkpoint):
    pytest.importorskip("torchvision", reason="transformers' video processor needs torchvision")
    from transformers import AutoVideoProcessor
    processor = AutoVideoProcessor.from_pretrained(checkpoint)
    frames = torch.from_numpy(np.stack(random_frames(2, size=(720, 1280))))
    grid = processor(videos=[frames.permute(0, 3, 1, 2)], return_tensors="pt")["video_grid_thw"][0].tolist()
    loaded = load_model(str(checkpoint), device="cpu")
    if not family_of(loaded.model).frame_pixels:
        pytest.skip("Qwen3-VL's processor bounds a whole clip's pixels; a stream bounds each frame")
    assert grid[1] * grid[2] // 4 == tokens_per_pair(loaded.preset, 720, 1280)


def test_the_qwen_vl_utils_budget_shares_pixels_among_frames():
    # qwen-vl-utils on 720p: 576 tokens per frame pair at 384 frames, 276 at 768 (measured, issue 16); at 32
    # frames the per-frame cap of 768 x 28 x 28 pixels binds (720 tokens)
    for frames, tokens in ((384, 576), (768, 276), (32, 720)):
        preset = within_total_pixels(*qwen_vl_utils_video(VisionPreset()), frames)
        assert tokens_per_pair(preset, 720, 1280) == tokens
    config = override(Config(), "video", total_pixels="qwen-vl-utils").validate()
    preset = config.video_preset(config.vision_preset(None), 384)
    assert tokens_per_pair(preset, 720, 1280) == 576
    assert Config().video_preset(VisionPreset(), 384) == VisionPreset()  # no budget: unchanged
    # Qwen3-VL's tokens are 32 x 32 pixels: its per-frame bounds are its family default, its budget scales too
    assert qwen_vl_utils_video(QWEN3_PRESET) == (QWEN3_PRESET, int(128000 * 32 * 32 * 0.9))
    with pytest.raises(ValueError, match="total_pixels"):
        override(Config(), "video", total_pixels="lots").validate()


def test_the_server_refuses_a_whole_video_pixel_budget(tiny_runner):
    config = override(Config(), "video", total_pixels=10**8)
    with pytest.raises(ValueError, match="live stream"):
        StreamService(tiny_runner, config, ServerLimits())


def test_generation_settings_come_from_the_checkpoint(checkpoint):
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    runner = Runner(loaded, preset=family_test_preset(loaded.model))
    ids = runner.tokenizer.convert_tokens_to_ids
    assert runner.stop_ids == {ids("<|im_end|>"), ids("<|endoftext|>")}
    assert runner.repetition_penalty == 1.05
    assert Runner(loaded, preset=family_test_preset(loaded.model), repetition_penalty=1.0).repetition_penalty == 1.0
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
    loaded = load_model(str(checkpoint), device="cpu")
    preset = family_test_preset(loaded.model)
    runner = Runner(loaded, preset=preset)
    assert runner.layout.source == "chat template"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    expected = runner.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Qwen3-VL: the frames replace the template's <|vision_start|><|video_pad|><|vision_end|>
    video = "<|vision_start|><|video_pad|><|vision_end|>" if runner.family.timestamps else "<|video_pad|>"
    assert runner.layout.prefix + video + runner.layout.question_suffix(QUESTION) == expected
    assert runner.layout.prefix + video == video_prefix(SYSTEM_PROMPT) + video.removeprefix("<|vision_start|>")
    assert video + runner.layout.question_suffix(QUESTION) == \
        video.removesuffix("<|vision_end|>") + question_suffix(QUESTION)
    # another layout (a base-model style template) is followed, not overridden
    plain = "{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}{% if c['type'] == " \
            "'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}Q: {{ c['text'] }}{% endif %}{% endfor " \
            "%}{% endif %}{% endfor %} A:"
    base = Runner(load_model(str(published_checkpoint(tmp_path / "base", template=plain, model_name=MODEL_OF[
        runner.model.config.model_type])), device="cpu"), preset=preset)
    if base.family.timestamps:
        assert base.layout.prefix == "" and base.layout.question_suffix("Why?") == "Q: Why? A:"
    else:
        assert base.layout.prefix == "<|vision_start|>"
        assert base.layout.question_suffix("Why?") == "<|vision_end|>Q: Why? A:"
    memory = stream(base, random_frames(2), 2)
    frame_text = len(base.encode("<0.2 seconds><|vision_start|><|vision_end|>")) if base.family.timestamps else 0
    assert memory.layers[0].positions.shape[-2] == len(base.prefix_ids) + 8 + frame_text
    broken = published_checkpoint(tmp_path / "broken", template="{{ messages[0]['content'][0]['text'] }}")
    with pytest.raises(ValueError, match="chat template"):
        Runner(load_model(str(broken), device="cpu"), preset=TEST_PRESET)
