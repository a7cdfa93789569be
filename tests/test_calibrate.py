"""`streamer calibrate`: per-layer weights from each layer's answer JS with it alone pruned, written into a config."""

import json

import pytest
from conftest import random_frames

from memory.probe import ProbeConfig
from streamer.cli import main
from streamer.config import load_config
from streamer.evaluation.calibrate import layer_js, layer_weights, write_config
from video_io.synthetic import write_video


def test_weights_follow_the_divergences_with_a_floor_and_a_mean_of_one():
    weights = layer_weights([0.4, 0.1, 0.0, 0.2], spread=20)
    assert sum(weights) / 4 == pytest.approx(1, abs=1e-3)
    assert weights[0] > weights[3] > weights[1] > weights[2] > 0
    assert weights[2] == pytest.approx(weights[0] / 20, rel=1e-3)  # nothing below the most needed / spread
    assert layer_weights([0.0, 0.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="finite JS"):
        layer_weights([0.1, float("nan")])


def test_a_written_config_reads_back_with_its_weights(tmp_path):
    out = tmp_path / "mine.toml"
    write_config("stream_default", [2.0, 0.5], out, "a note")
    config = load_config(str(out))
    assert config.policies["emloc"]["layer_weights"] == [2.0, 0.5] and config.memory.budget == 8192
    write_config(str(out), [1.5, 0.5], out, "again")  # written over itself: one line, replaced
    assert out.read_text().count("layer_weights") == 1 and load_config(str(out)).policies["emloc"][
        "layer_weights"] == [1.5, 0.5]


def test_a_layer_kept_whole_moves_nothing_and_a_pruned_one_does(tiny_runner):
    frames = random_frames(8, seed=31)
    probe = ProbeConfig(js_positions=3, answer_tokens=2)
    whole = layer_js(tiny_runner, frames, 4, probe, ratio=1.0, answer_tokens=4)
    assert len(whole) == tiny_runner.num_layers and max(whole) < 1e-6
    pruned = layer_js(tiny_runner, frames, 4, probe, ratio=0.1, answer_tokens=4)
    assert max(pruned) > 1e-4


def test_the_command_writes_a_config_and_refuses_clearly(tmp_path, capsys):
    video = tmp_path / "v.mp4"
    write_video(video, 16, fps=8.0, size=(112, 56))
    out = tmp_path / "calibrated.toml"
    args = ["-q", "calibrate", str(video), "--model", "tiny-random", "--frames", "8", "--out", str(out)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["layer_weights"]) == len(printed["layer_js"]) == 6
    assert load_config(str(out)).policies["emloc"]["layer_weights"] == printed["layer_weights"]
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no --force
    assert main(["-q", "calibrate", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "x.toml")]) == 2
    assert "none.mp4" in capsys.readouterr().err
    assert main(["-q", "calibrate", str(video), "--config", "default", "--out", str(tmp_path / "x.toml")]) == 2
    assert "layer weights are emloc's" in capsys.readouterr().err
