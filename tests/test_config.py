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


@pytest.mark.parametrize("section, values, message", [
    ("memory", {"chunk_frames": 5}, "multiple of 2"),
    ("video", {"frames": 0}, "frames"),
    ("video", {"backend": "opencv"}, "backend"),
    ("video", {"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
])
def test_invalid_values(section, values, message):
    with pytest.raises(ValueError, match=message):
        override(Config(), section, **values).validate()
