"""Memory snapshots: a saved and reloaded memory answers and continues exactly; bad files are refused."""

import json
import struct

import pytest
import torch
from conftest import FAMILY_FPS, question_logits, random_frames
from reference import RaggedSubsetPolicy
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memory.snapshot as snapshot
from memory.baselines import FullPolicy
from memory.snapshot import STREAM_FIELDS, TENSOR_FIELDS, load_memory, save_memory
from streamer.engine.models import model_identity
from streamer.engine.models import build_random_model, builtin_config, tiny_tokenizer
from streamer.engine.stream import ingest_video

QUESTION = "What happens in the video?"
CONFIG = {"model": "tiny-random", "policy": "full", "chunk_frames": 2}


@pytest.fixture(scope="module")
def identity(tiny_runner):
    return model_identity(tiny_runner.model, "tiny-random")


@pytest.fixture(scope="module")
def saved(tiny_runner, identity, tmp_path_factory):
    """A small full-policy snapshot, for the tests that only need a valid file."""
    path = tmp_path_factory.mktemp("snapshot") / "memory.safetensors"
    save_memory(ingest_video(tiny_runner, random_frames(4), FullPolicy(), 2), path, identity, CONFIG)
    return path


@pytest.mark.parametrize("policy", [FullPolicy(), RaggedSubsetPolicy(seed=0)], ids=["full", "ragged"])
def test_round_trip_answers_identically(family_runner, tmp_path, policy):
    tiny_runner = family_runner
    identity = model_identity(tiny_runner.model, tiny_runner.model_name)
    memory = ingest_video(tiny_runner, random_frames(6, seed=1), policy, 2, fps=FAMILY_FPS)
    if isinstance(policy, RaggedSubsetPolicy):
        assert len(set(memory.tokens_per_layer())) > 1, "the test policy should leave layers with different lengths"
    path = tmp_path / "memory.safetensors"
    save_memory(memory, path, identity, CONFIG)
    loaded, meta = load_memory(path, identity)

    assert meta["config"] == CONFIG and meta["model"] == identity and meta["dtype"] == "float32"
    for name in STREAM_FIELDS:
        assert getattr(loaded, name) == getattr(memory, name), name
    for original, restored in zip(memory.layers, loaded.layers, strict=True):
        for name in TENSOR_FIELDS:
            a, b = getattr(original, name), getattr(restored, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name  # torch.equal: inf == inf
    assert torch.isinf(loaded.layers[0].importance).any(), "prompt text should stay protected"
    assert torch.equal(question_logits(tiny_runner, loaded, QUESTION), question_logits(tiny_runner, memory, QUESTION))
    assert (tiny_runner.answer(loaded, QUESTION, max_new_tokens=6).token_ids
            == tiny_runner.answer(memory, QUESTION, max_new_tokens=6).token_ids)


def test_loaded_memory_continues_the_stream(family_runner, tmp_path):
    """A reloaded stream keeps its frame rate: the frames after it get the positions they would have had."""
    tiny_runner = family_runner
    identity = model_identity(tiny_runner.model, tiny_runner.model_name)
    frames = random_frames(8, seed=2)
    path = tmp_path / "memory.safetensors"
    save_memory(ingest_video(tiny_runner, frames[:4], FullPolicy(), 2, fps=FAMILY_FPS), path, identity)
    resumed = ingest_video(tiny_runner, frames[4:], FullPolicy(), 2, load_memory(path, identity)[0])
    continuous = ingest_video(tiny_runner, frames, FullPolicy(), 2, fps=FAMILY_FPS)
    assert resumed.fps == FAMILY_FPS
    assert resumed.frames == continuous.frames and resumed.next_position == continuous.next_position
    torch.testing.assert_close(question_logits(tiny_runner, resumed, QUESTION),
                               question_logits(tiny_runner, continuous, QUESTION), atol=1e-6, rtol=0)


def test_same_architecture_other_weights_is_refused(identity, saved):
    def tiny_identity(seed, name):
        model = build_random_model(builtin_config("tiny-random", tiny_tokenizer()), torch.device("cpu"),
                                   torch.float32, seed=seed)
        return model_identity(model, name)

    assert tiny_identity(0, "tiny-random") == identity, "the identity should be reproducible"
    other = tiny_identity(1, "tiny-random-seed1")
    assert other["architecture"] == identity["architecture"] and other["weights"] != identity["weights"]
    with pytest.raises(ValueError, match="another model") as error:
        load_memory(saved, other)
    assert "'tiny-random'" in str(error.value) and "'tiny-random-seed1'" in str(error.value)
    assert "different weights" in str(error.value)
    assert load_memory(saved, None)[0].frames == 4, "identity=None skips the model check"


def test_other_architecture_is_refused(saved):
    # Built on meta: no weights to hash, so the identity carries weights=None and is checked on architecture.
    model = build_random_model(builtin_config("qwen2-vl-2b-random", tiny_tokenizer()), torch.device("meta"),
                               torch.float32)
    other = model_identity(model, "qwen2-vl-2b-random")
    assert other["weights"] is None
    with pytest.raises(ValueError, match="another model") as error:
        load_memory(saved, other)
    assert "'qwen2-vl-2b-random' (28 layers" in str(error.value) and "'tiny-random' (6 layers" in str(error.value)


def test_other_family_of_the_same_size_is_refused(saved):
    model = build_random_model(builtin_config("tiny-random-qwen2.5-vl", tiny_tokenizer()), torch.device("meta"),
                               torch.float32)  # the tiny Qwen2-VL's text model, another family's vision tower
    with pytest.raises(ValueError, match="different architecture"):
        load_memory(saved, model_identity(model, "tiny-random-qwen2.5-vl"))


def rewrite(saved, path, version=None, drop=None):
    """Copy a snapshot with its version replaced or one tensor dropped."""
    with safe_open(saved, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(saved)
    if version is not None:
        metadata["version"] = version
    tensors.pop(drop, None)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("kind, error, message", [
    ("missing", FileNotFoundError, "no memory snapshot"),
    ("text", ValueError, "not a safetensors file"),
    ("plain", ValueError, "not a memory snapshot"),
    ("future", ValueError, r"version 99, this build reads version\(s\) 1, 2"),
    ("truncated", ValueError, "damaged: tensors layers.1.importance are missing"),
])
def test_bad_files_are_refused(identity, saved, tmp_path, kind, error, message):
    path = tmp_path / "bad.safetensors"
    if kind == "text":
        path.write_text("not a snapshot\n")
    elif kind == "plain":
        save_file({"weight": torch.zeros(2, 2)}, path)
    elif kind == "future":
        rewrite(saved, path, version="99")
    elif kind == "truncated":
        rewrite(saved, path, drop="layers.1.importance")
    with pytest.raises(error, match=message):
        load_memory(path, identity)


def test_file_is_plain_safetensors(saved):
    data = saved.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, JSON header, raw tensors
    header = json.loads(data[8:8 + header_len])
    assert header["__metadata__"]["format"] == snapshot.SNAPSHOT_FORMAT
    assert header["__metadata__"]["version"] == str(snapshot.SNAPSHOT_VERSION)
    assert set(load_file(saved)) == set(header) - {"__metadata__"}


def test_interrupted_save_keeps_the_old_file(identity, saved, tmp_path, monkeypatch):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(saved.read_bytes())

    def crash(tensors, filename, metadata):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    memory = load_memory(saved, identity)[0]
    monkeypatch.setattr(snapshot, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_memory(memory, path, identity)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "the temporary file should be removed"
    assert load_memory(path, identity)[0].frames == 4


def tamper(saved, path, edit):
    """Copy a snapshot with its JSON metadata edited by edit(meta)."""
    with safe_open(saved, framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata["meta"])
    edit(meta)
    metadata["meta"] = json.dumps(meta)
    save_file(load_file(saved), path, metadata=metadata)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(num_layers=0), "num_layers"),
    (lambda m: m.update(num_layers=2_000_000), "layers"),
    (lambda m: m.update(kv_heads="two"), "kv_heads"),
    (lambda m: m.update(dtype="float64x"), "dtype"),
    (lambda m: m["stream"].update(grid_hw=5), "stream.grid_hw"),
    (lambda m: m["stream"].update(grid_hw=[4, "8"]), "stream.grid_hw"),
    (lambda m: m.update(stream=None), "stream"),
    (lambda m: m["model"].pop("architecture"), "model.architecture"),
    (lambda m: m["stream"].update(frames=-5), "stream.frames"),
    (lambda m: m["stream"].update(next_position="abc"), "stream.next_position"),
    (lambda m: m["stream"].update(budget=True), "stream.budget"),
    (lambda m: m["stream"].update(chunks=[1, 2]), "stream.chunks"),
    (lambda m: m["stream"].update(fps="2"), "stream.fps"),
    (lambda m: m["stream"].update(fps=-1.0), "stream.fps"),
])
def test_tampered_headers_are_refused_naming_the_field(identity, saved, tmp_path, edit, field):
    path = tmp_path / "tampered.safetensors"
    tamper(saved, path, edit)
    with pytest.raises(ValueError, match=field):
        load_memory(path, identity)
    with pytest.raises(ValueError, match=field):
        load_memory(path, None)  # refused on the header alone, before any model check
