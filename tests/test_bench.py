"""`streamer bench` smoke run on the tiny model (the real figures come from a GPU run)."""

import json

import pytest
from transformers import Qwen2VLConfig

from streamer.cli.bench import frame_size, llm_prefill_flops, vision_flops
from streamer.engine.models import qwen2_5_vl_vision, qwen2_vl_vision, qwen3_vl_vision
from streamer.cli import main
from streamer.engine.models import builtin_config, tiny_tokenizer


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model", "tiny-random", "--device", "cpu", "--frames", "16", "--tokens-per-pair",
                 "4", "--chunk-frames", "4", "--repeats", "1", "--warmup", "1", "--decode-tokens", "4",
                 "--out", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    report = json.loads(out.read_text())
    assert report["video_tokens"] == 16 // 2 * 4
    assert report["vision"]["seconds"] > 0 and report["vision"]["stock_seconds"] > 0
    policies = report["policies"]
    assert set(policies) == {"full", "emloc", "uniform"}
    assert policies["full"]["chunks"] == 1 and policies["emloc"]["chunks"] == 4
    assert policies["full"]["retention"] == 1.0
    assert policies["emloc"]["memory_tokens"] <= policies["full"]["memory_tokens"]
    for result in policies.values():
        assert result["ingest_s"] > 0 and result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0
        assert result["prefill_tflops"] > 0
    assert "ingest s" in capsys.readouterr().out
    markdown = (tmp_path / "bench.md").read_text()
    assert ("`streamer bench --model tiny-random --device cpu --frames 16 --tokens-per-pair 4 --chunk-frames 4 "
            "--decode-tokens 4 --repeats 1`") in markdown
    assert "| emloc ingest / full ingest |" in markdown and "| full |" in markdown


def test_fixed_ratio_takes_that_ratio_everywhere(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model", "tiny-random", "--device", "cpu", "--frames", "8", "--tokens-per-pair",
                 "4", "--chunk-frames", "4", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
                 "--policies", "emloc", "--fixed-ratios", "0.25", "--answer-tokens", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(r == 0.25 for chunk in report["policies"]["emloc"]["ratios"] for r in chunk)
    assert report["options"]["answer_tokens"] == 0


def test_frame_size_gives_exact_token_counts():
    assert frame_size(144) == (252, 448)  # 9 x 16 blocks of 28 pixels: VideoMME's 144 tokens per pair
    for tokens in (1, 4, 7, 64, 100):
        height, width = frame_size(tokens)
        assert (height // 28) * (width // 28) == tokens


def test_flop_counts_of_the_7b_architecture():
    config = builtin_config("qwen2-vl-7b-random", tiny_tokenizer())
    assert isinstance(config, Qwen2VLConfig)
    # 27,648 video tokens at once: ~2 x 7.07e9 parameters x tokens for the linear layers, plus attention
    prefill = llm_prefill_flops(config.text_config, 27648, 0)
    linear_params = 28 * (2 * 3584 ** 2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert prefill == pytest.approx(2 * 27648 * linear_params + 28 * 4 * 27648 * 27649 / 2 * 3584)
    assert 500e12 < prefill < 560e12  # docs/DESIGN.md section 8 quotes ~560 TFLOP/s for this prefill at 0.97 s
    vision = vision_flops(qwen2_vl_vision(config.vision_config), config.vision_config, 192, 18, 32)  # 384 frames of 252x448
    assert 100e12 < vision < 400e12


def test_vision_flops_of_the_qwen25_vl_7b_tower():
    """Qwen2.5-VL's tower: a gated MLP, and attention within 8x8-patch windows except in 4 full blocks;
    the count, worked by hand for one frame pair of 16x16 patches (four windows)."""
    config = builtin_config("qwen2.5-vl-7b-random", tiny_tokenizer()).vision_config
    patches, dim = 256, 1280
    linear = 2 * patches * (4 * dim * dim + 3 * dim * 3420)
    attention = 4 * patches * dim * (28 * 64 + 4 * 256)
    merger = 2 * 64 * (5120 * 5120 + 5120 * 3584)
    embed = 2 * patches * (3 * 2 * 14 * 14) * dim
    assert vision_flops(qwen2_5_vl_vision(config), config, 1, 16, 16) == pytest.approx(
        embed + 32 * linear + attention + merger)


def test_bench_runs_on_qwen25_vl(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model", "tiny-random-qwen2.5-vl", "--device", "cpu", "--frames", "8",
                 "--tokens-per-pair", "4", "--chunk-frames", "4", "--policies", "full", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["options"]["model"] == "tiny-random-qwen2.5-vl" and report["video_tokens"] == 16
    assert report["vision"]["seconds"] > 0 and report["vision"]["stock_seconds"] > 0


def test_flop_counts_of_the_qwen3_vl_8b_architecture():
    """Qwen3-VL: query width heads x head_dim (4096 here, as hidden), a plain-MLP tower attending over the whole
    pair in all 27 blocks, and a merger per DeepStack feature besides the final one; worked by hand."""
    config = builtin_config("qwen3-vl-8b-random", tiny_tokenizer())
    linear_params = 36 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288)
    assert llm_prefill_flops(config.text_config, 1000, 0) == pytest.approx(
        2 * 1000 * linear_params + 36 * 4 * 1000 * 1001 / 2 * 4096)
    patches, dim = 256, 1152
    blocks = 27 * (2 * patches * (4 * dim * dim + 2 * dim * 4304) + 4 * patches * patches * dim)
    merger = 2 * 64 * (4608 * 4608 + 4608 * 4096)
    embed = 2 * patches * (3 * 2 * 16 * 16) * dim
    assert vision_flops(qwen3_vl_vision(config.vision_config), config.vision_config, 1, 16, 16) == pytest.approx(
        embed + blocks + 4 * merger)


def test_flop_count_follows_head_dim_where_it_is_not_hidden_over_heads():
    text = builtin_config("qwen3-vl-4b-random", tiny_tokenizer()).text_config  # 32 heads of 128 over 2560
    linear_params = 36 * (2 * 2560 * 4096 + 2 * 2560 * 1024 + 3 * 2560 * 9728)
    assert llm_prefill_flops(text, 10, 0) == pytest.approx(2 * 10 * linear_params + 36 * 4 * 10 * 11 / 2 * 4096)


def test_bench_runs_on_qwen3_vl(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model", "tiny-random-qwen3-vl", "--device", "cpu", "--frames", "8",
                 "--tokens-per-pair", "4", "--chunk-frames", "4", "--policies", "full,emloc", "--repeats", "1",
                 "--warmup", "0", "--decode-tokens", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["frame_size"] == [64, 64] and report["video_tokens"] == 16  # 2 x 2 tokens of 32 x 32 pixels
    assert report["policies"]["full"]["video_retention"] == 1.0  # the frame text is not counted as video
    assert report["vision"]["tflops"] > 0
