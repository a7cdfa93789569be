"""`streamer eval synthetic`: its statistics, the oracle policy, and the JSON it writes."""

import json

import numpy as np
import pytest
import torch

from memory.baselines import FullPolicy
from streamer.builtin.videos import make_video
from streamer.cli import main
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.evaluation.synthetic import OraclePolicy, Run, bootstrap_interval, uniform_at


def run(fraction: float, correct: list[list[bool]], js: float = 0.0) -> Run:
    videos = len(correct)
    return Run("uniform", "u", {}, correct=correct, answer_js=[[js] * len(c) for c in correct],
               memory_tokens=[fraction * 100] * videos, full_tokens=[100] * videos)


def test_uniform_is_interpolated_per_video_at_equal_memory():
    sweep = [run(0.1, [[False, False], [True, False]], js=0.4), run(0.3, [[True, True], [True, True]], js=0.0)]
    scores, js = uniform_at(sweep, 0.15)  # a quarter of the way from 0.1 to 0.3
    np.testing.assert_allclose(scores, [0.25, 0.5 + 0.25 * 0.5])
    np.testing.assert_allclose(js, [0.3, 0.3])
    np.testing.assert_allclose(uniform_at(sweep, 0.3)[0], [1.0, 1.0])
    assert uniform_at(sweep, 0.05) is None and uniform_at(sweep, 0.5) is None  # never extrapolated


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    values = rng.random(400)
    low, high = bootstrap_interval(values, 2000)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std() / 20, rel=0.15)  # the normal interval's width
    assert bootstrap_interval(np.ones(10), 200) == [1.0, 1.0]


@pytest.fixture(scope="module")
def builtin():
    loaded = load_model("builtin", device="cpu", dtype="float32")
    return Runner(loaded, preset=loaded.preset)


@pytest.mark.parametrize("extra", [0, 2])
def test_oracle_keeps_the_event_tokens(builtin, extra):
    video = make_video(3, 64)
    shows = torch.from_numpy(video.event_tokens())
    shows[7::8] = True  # and each 16-frame chunk's last frame pair
    memory = ingest_video(builtin, video.frames(), OraclePolicy(events=video.event_tokens(), extra=extra), 16)
    full = ingest_video(builtin, video.frames(), FullPolicy(), 16)
    prefix = len(builtin.prefix_ids)
    for layer in memory.layers:
        for positions in layer.positions:
            video_positions = positions[prefix:] - memory.video_start
            kept = torch.zeros_like(shows)
            kept[video_positions[:, 0], video_positions[:, 1], video_positions[:, 2]] = True
            assert positions[:prefix, 0].tolist() == list(range(prefix))
            assert torch.all(kept >= shows), "every event token and each chunk's last pair is kept"
            assert int((kept & ~shows).sum()) == extra * len(memory.chunks), "plus k others per chunk"
    assert memory.mean_tokens() < full.mean_tokens()


def test_worker_processes_measure_what_one_process_does(tmp_path, capsys):
    """Two processes, each streaming half of the videos under every policy, give one process's rows."""
    rows = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        assert main(["-q", "eval", "synthetic", "--lengths", "32", "--videos", "4", "--chunk-frames", "16",
                     "--policies", "emloc,window", "--uniform-ratios", "0.05,0.3", "--oracle-extra", "2",
                     "--ablate-layers", "0", "--bootstrap", "50", "--workers", workers, "--json", str(out)]) == 0
        rows.append([{k: v for k, v in row.items() if not k.endswith("_s_per_chunk") and k != "seconds"}
                     for row in json.loads(out.read_text())["results"]])
        if workers == "1":  # progress inside each wave (the quick run printed nothing for ~10 minutes)
            assert "32 frames, uniform 0.05 (2 of 5): 4 videos (seeds 0-3)" in capsys.readouterr().err
    assert rows[0] == rows[1]
    assert [row["label"] for row in rows[0]] == ["full", "uniform 0.05", "uniform 0.3", "emloc", "window", "oracle + 2"]
    capsys.readouterr()


def test_eval_synthetic_json(tmp_path, capsys):
    out = tmp_path / "synthetic.json"
    markdown = tmp_path / "SYNTHETIC.md"
    code = main(["-q", "eval", "synthetic", "--lengths", "32", "--videos", "4", "--chunk-frames", "16",
                 "--policies", "emloc,pyramid", "--uniform-ratios", "0.05,0.3", "--oracle-extra", "0",
                 "--bootstrap", "200", "--json", str(out), "--write", str(markdown)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {row["label"]: row for row in report["results"]}
    ablations = [f"layer {k} alone at 0.02" for k in range(8)]  # the builtin's 8 layers, one at a time
    assert list(rows) == ["full", "uniform 0.05", "uniform 0.3", "emloc", "pyramid", "oracle", *ablations]
    for label in ablations:  # one layer of 8 keeps 2% of the video: 7/8 of the memory and a bit
        assert 7 / 8 < rows[label]["memory_fraction"] < 0.92
    for row in rows.values():
        assert row["frames"] == 32 and row["videos"] == 4
        low, high = row["accuracy_interval"]
        assert low <= row["accuracy"] <= high
        assert len(row["correct"]) == 4 and 100 * np.mean(row["correct"]) == pytest.approx(row["accuracy"])
        assert 0 < row["memory_fraction"] <= 1 and row["answer_js"] >= 0
        if row["policy"] == "uniform":
            assert "vs_uniform" not in row
        else:
            assert "vs_uniform" in row and "vs_uniform_interval" in row
    assert rows["full"]["memory_fraction"] == 1 and rows["full"]["answer_js"] == 0
    assert rows["full"]["vs_uniform"] == 0 and rows["full"]["vs_uniform_interval"] == [0, 0]
    assert rows["uniform 0.05"]["memory_fraction"] < rows["uniform 0.3"]["memory_fraction"]
    assert rows["emloc"]["probe_s_per_chunk"] > 0 and rows["full"]["probe_s_per_chunk"] == 0
    assert "| emloc |" in markdown.read_text() and "vs uniform" in capsys.readouterr().out
