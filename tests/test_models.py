import pytest
import torch
from conftest import FAMILY_MODELS, family_test_preset, question_logits, random_frames

from memory.baselines import FullPolicy
from streamer.engine.models import BUILTIN_MODELS, build_random_model, builtin_config, load_model, tiny_tokenizer
from streamer.engine.runner import Runner


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_tiny_random_is_deterministic(name):
    a, b = load_model(name, device="cpu"), load_model(name, device="cpu")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_tiny_tokenizer_has_qwen_special_tokens():
    tokenizer = tiny_tokenizer()
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|vision_end|>Hi<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == 2
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_save_and_load_round_trip(tmp_path, name):
    """A saved checkpoint of each family loads by path, recognised by its config's model_type."""
    loaded = load_model(name, device="cpu")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert type(reloaded.model) is type(loaded.model)
    frames = random_frames(4)
    logits = []
    for model in (loaded, reloaded):
        runner = Runner(model, preset=family_test_preset(model.model))
        memory = runner.new_memory()
        runner.ingest(memory, frames, FullPolicy())
        logits.append(question_logits(runner, memory, "What is it?"))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint at .*built-in model"):
        load_model(str(tmp_path / "nowhere"), device="cpu")


@pytest.mark.parametrize("name, billions, layers, kv_heads", [
    ("qwen2-vl-2b-random", 2.21, 28, 2), ("qwen2-vl-7b-random", 8.29, 28, 4), ("qwen2-vl-72b-random", 73.4, 80, 8),
    ("qwen2.5-vl-3b-random", 3.75, 36, 2), ("qwen2.5-vl-7b-random", 8.29, 28, 4), ("qwen2.5-vl-72b-random", 73.4, 80, 8),
    ("qwen3-vl-2b-random", 2.13, 28, 8), ("qwen3-vl-4b-random", 4.44, 36, 8), ("qwen3-vl-8b-random", 8.77, 36, 8),
    ("qwen3-vl-32b-random", 33.4, 64, 8),
])
def test_architecture_configs_match_the_released_sizes(name, billions, layers, kv_heads):
    assert name in BUILTIN_MODELS
    config = builtin_config(name, tiny_tokenizer())
    model = build_random_model(config, torch.device("meta"), torch.bfloat16)  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
    assert config.text_config.num_hidden_layers == layers
    assert config.text_config.num_key_value_heads == kv_heads


def test_unknown_builtin_or_device_errors():
    with pytest.raises(ValueError, match="unknown built-in"):
        builtin_config("qwen3-huge", tiny_tokenizer())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("tiny-random", device="cuda")
