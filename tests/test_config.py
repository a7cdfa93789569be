import pytest

from streamer.config import CONFIG_DIR, Config, load_config, override


def test_default_file_loads_and_validates():
    config = load_config("default")
    assert config.memory.policy == "full"
    assert config.validate() is config


def test_every_shipped_config_loads():
    for path in CONFIG_DIR.glob("*.toml"):
        load_config(str(path)).validate()


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[memory]\nchunk_frame = 8\n")
    with pytest.raises(ValueError, match="chunk_frame"):
        load_config(str(path))
    path.write_text("[memroy]\n")
    with pytest.raises(ValueError, match="memroy"):
        load_config(str(path))


def test_fps_in_a_file_replaces_frame_count(tmp_path):
    path = tmp_path / "fps.toml"
    path.write_text("[video]\nfps = 1.0\nmax_frames = 64\n")
    config = load_config(str(path)).validate()
    assert config.video.frames is None and config.video.fps == 1.0


def test_switches_override_only_what_is_given():
    config = override(Config(), "memory", chunk_frames=8, policy=None)
    assert config.memory.chunk_frames == 8 and config.memory.policy == "full"


def test_no_cuda_graphs_reaches_the_runner(monkeypatch):
    from streamer.cli import build_parser
    from streamer.cli.switches import config_from_args
    from streamer.engine import runner

    args = build_parser().parse_args(["ask", "v.mp4", "q?", "--model", "tiny-random", "--no-cuda-graphs"])
    config = config_from_args(args)
    assert config.model.cuda_graphs is False
    assert config_from_args(build_parser().parse_args(["ask", "v.mp4", "q?"])).model.cuda_graphs is True
    made, real = {}, runner.Runner

    def spy(*args, **kwargs):
        made.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "Runner", spy)
    runner.load_runner(config)
    assert made["cuda_graphs"] is False


@pytest.mark.parametrize("section, values, message", [
    ("memory", {"chunk_frames": 5}, "multiple of 2"),
    ("video", {"frames": 0}, "frames"),
    ("video", {"backend": "opencv"}, "backend"),
    ("video", {"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
    ("model", {"cuda_graphs": "yes"}, "cuda_graphs"),
    ("memory", {"tier_growth": -1}, "tier_growth"),
])
def test_invalid_values(section, values, message):
    with pytest.raises(ValueError, match=message):
        override(Config(), section, **values).validate()


@pytest.mark.parametrize("text", ["[emloc]\ndelta = nan\n", "[emloc]\ndelta = inf\n", "[emloc]\noutlier_factor = nan\n",
                                  "[pyramid]\nbeta = nan\n", "[uniform]\nratio = nan\n", "[video]\nfps = nan\n",
                                  "[video]\nfps = inf\n"])
def test_nan_and_infinity_in_a_file_are_refused(tmp_path, text):
    path = tmp_path / "nan.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="finite|must be in"):
        load_config(str(path)).validate()


def test_policy_sections_and_probe(tmp_path):
    path = tmp_path / "emloc.toml"
    path.write_text('[memory]\npolicy = "emloc"\n[emloc]\ndelta = 0.1\nratios = [0.05, 1.0]\n'
                    '[probe]\nmode = "question"\njs_positions = 4\n')
    config = load_config(str(path)).validate()
    policy = config.make_policy("Why?")
    assert policy.delta == 0.1 and policy.ratios == [0.05, 1.0]
    assert policy.probe.prompts == ["Why?"] and policy.probe.js_positions == 4
    path.write_text("[emloc]\ndelt = 0.1\n")
    with pytest.raises(ValueError, match="delt"):
        load_config(str(path))
    path.write_text("[emloc]\ndelta = -1.0\n")
    with pytest.raises(ValueError, match="delta"):
        load_config(str(path))


def test_presets_carry_the_paper_settings():
    config = load_config("videomme_emloc").validate()
    assert (config.video.frames, config.video.min_pixels, config.video.max_pixels) == (384, 144 * 784, 144 * 784)
    assert config.policies["emloc"] == {"delta": 0.04, "ratios": [0.02, 0.1, 0.5, 1.0], "group_size": 14}
    reference = load_config("emloc_reference").validate()
    assert reference.policies["emloc"] == {"delta": 0.05, "ratios": [0.02, 0.05, 0.1, 1.0], "group_size": 7}
    assert reference.memory.chunk_frames == 64
    stream = load_config("stream_default").validate()
    assert stream.memory.budget > 0 and stream.probe.mode == "generic"
