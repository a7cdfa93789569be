"""`streamer calibrate`: per-layer weights from each layer's answer JS with it alone pruned, written into a config."""

import json

import pytest
from conftest import random_frames

from memory.probe import ProbeConfig
from streamer.cli import main
from streamer.config import load_config
from streamer.evaluation.calibrate import (AnswerJS, candidate_profiles, layer_js, layer_weights, profile_js,
                                           profile_ratios, write_config)
from video_io.synthetic import write_video


def test_weights_follow_the_divergences_with_a_floor_and_a_mean_of_one():
    weights = layer_weights([0.4, 0.1, 0.0, 0.2], spread=20)
    assert sum(weights) / 4 == pytest.approx(1, abs=1e-3)
    assert weights[0] > weights[3] > weights[1] > weights[2] > 0
    assert weights[2] == pytest.approx(weights[0] / 20, rel=1e-3)  # nothing below the most needed / spread
    assert layer_weights([0.0, 0.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="finite JS"):
        layer_weights([0.1, float("nan")])


def test_a_written_config_reads_back_with_its_profile(tmp_path):
    out = tmp_path / "mine.toml"
    write_config("stream_default", dict(layer_weights=[2.0, 0.5]), out, "a note")
    config = load_config(str(out))
    assert config.policies["emloc"]["layer_weights"] == [2.0, 0.5] and config.memory.budget == 8192
    write_config(str(out), dict(layer_weights=[1.5, 0.5]), out, "again")  # written over itself: one line, replaced
    assert out.read_text().count("layer_weights =") == 1 and load_config(str(out)).policies["emloc"][
        "layer_weights"] == [1.5, 0.5]
    write_config(str(out), dict(layer_beta=5.0, layer_weights=[]), out, "a pyramid")  # weights dropped
    emloc = load_config(str(out)).policies["emloc"]
    assert emloc["layer_beta"] == 5.0 and "layer_weights" not in emloc and out.read_text().count("layer_beta =") == 1
    write_config("stream_default", {}, out, "the base's own")
    assert load_config(str(out)).policies == load_config("stream_default").policies


def test_a_layer_kept_whole_moves_nothing_and_a_pruned_one_does(tiny_runner):
    judge = AnswerJS(tiny_runner, random_frames(8, seed=31), 4, answer_tokens=4)
    probe = ProbeConfig(js_positions=3, answer_tokens=2)
    whole = layer_js(judge, probe, ratio=1.0)
    assert len(whole) == tiny_runner.num_layers and max(whole) < 1e-6
    pruned = layer_js(judge, probe, ratio=0.1)
    assert max(pruned) > 1e-4
    layers = tiny_runner.num_layers
    profiles = profile_js(judge, probe, {"whole": [1.0] * layers, "thin": [0.1] * layers})
    assert profiles["whole"] < 1e-6 < profiles["thin"], "a profile's JS is its memory's, compared by name"


def test_candidate_profiles_keep_the_same_size():
    """The base's own profile first (it wins ties), PyramidKV's at other steepness, the JS weights; every one
    keeps the same mean share of a chunk, so their JS compares how they spend it."""
    base = load_config("stream_default").make_policy()
    candidates = candidate_profiles(base, [0.4, 0.1, 0.05, 0.01], spread=20)
    assert list(candidates)[0] == "base" and candidates["base"] == {}
    assert "pyramid 20" not in candidates and {"pyramid 1", "pyramid 5", "layer JS^1", "layer JS^0.5"} <= set(candidates)
    for options in candidates.values():
        ratios = profile_ratios(base, options, 0.05, 4)
        assert sum(ratios) / 4 == pytest.approx(0.05, rel=1e-3)
    flat, steep = (profile_ratios(base, candidates[name], 0.05, 4) for name in ("layer JS^0.5", "layer JS^1"))
    assert steep[0] / steep[-1] > flat[0] / flat[-1] > 1


def test_the_command_writes_a_config_and_refuses_clearly(tmp_path, capsys):
    video = tmp_path / "v.mp4"
    write_video(video, 16, fps=8.0, size=(112, 56))
    out = tmp_path / "calibrated.toml"
    args = ["-q", "calibrate", str(video), "--model", "tiny-random", "--frames", "8", "--out", str(out),
            "--prompts", "What colour appeared first?;Where was it?"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["layer_weights"]) == len(printed["layer_js"]) == 6
    assert printed["chosen"] == min(printed["profile_js"], key=printed["profile_js"].get)
    emloc = load_config(str(out)).policies["emloc"]
    assert all(emloc.get(key, []) == value for key, value in printed["emloc"].items())
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no --force
    assert main(["-q", "calibrate", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "x.toml")]) == 2
    assert "none.mp4" in capsys.readouterr().err
    assert main(["-q", "calibrate", str(video), "--config", "default", "--out", str(tmp_path / "x.toml")]) == 2
    assert "layer weights are emloc's" in capsys.readouterr().err
