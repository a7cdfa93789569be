"""Memory snapshots: save a stream's KV memory to one .safetensors file and load it back.

The file holds only tensors and a JSON header (no pickle), so loading an untrusted snapshot
cannot run code. Keys are stored after RoPE and carry the model's weights in them, so a
snapshot is only meaningful for the model that made it: the header records that model's
identity (a dict the engine makes: streamer.engine.models.model_identity) and loading refuses any other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memory.store import (HISTORY, TOKEN_FIELDS, ChunkRecord, KVMemory, LayerMemory, check_age_power,
                          check_tier_growth, chunk_ranks)

SNAPSHOT_FORMAT = "video-streamer-memory"
# 4: each token's JS level (tiered compaction); 3: a history of four numbers per chunk, reports of the newest
# chunks only; 2: each token's chunk and rank (evictions by age); 1 lacks them
SNAPSHOT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
TENSOR_FIELDS = TOKEN_FIELDS
V1_TENSOR_FIELDS = ("keys", "values", "positions", "importance")
V3_TENSOR_FIELDS = tuple(name for name in TOKEN_FIELDS if name != "level")  # versions 2 and 3


def tensor_fields(version: str) -> tuple[str, ...]:
    return {"1": V1_TENSOR_FIELDS, "2": V3_TENSOR_FIELDS, "3": V3_TENSOR_FIELDS}.get(version, TENSOR_FIELDS)
STREAM_FIELDS = tuple(f.name for f in dataclasses.fields(KVMemory)
                      if f.name != "layers" and f.metadata.get("snapshot", True))


def stream_fields(memory: KVMemory) -> dict:
    """The memory's fields but its tensors, as a snapshot's JSON header holds them."""
    return {name: [c.to_dict() for c in memory.chunks] if name == "chunks" else getattr(memory, name)
            for name in STREAM_FIELDS}


def save_memory(memory: KVMemory, path, identity: dict, config: dict | None = None) -> None:
    """Write `memory` to `path` atomically: an interrupted save leaves any old file there intact."""
    path = Path(path)
    tensors = {f"layers.{i}.{name}": getattr(layer, name).detach().to("cpu").contiguous()
               for i, layer in enumerate(memory.layers) for name in TENSOR_FIELDS}
    _, kv_heads, _, head_dim = memory.layers[0].keys.shape
    meta = dict(model=identity, config=config or {}, dtype=str(memory.layers[0].keys.dtype).removeprefix("torch."),
                num_layers=len(memory.layers), kv_heads=kv_heads, head_dim=head_dim,
                stream=stream_fields(memory),
                created_at=datetime.now(timezone.utc).isoformat())
    header = dict(format=SNAPSHOT_FORMAT, version=str(SNAPSHOT_VERSION), meta=json.dumps(meta))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _describe(identity: dict) -> str:
    a = identity["architecture"]
    return (f"{identity['name']!r} ({a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
            f"{a['num_attention_heads']} heads / {a['num_key_value_heads']} KV heads, vocab {a['vocab_size']})")


def _check_model(saved: dict, current: dict, path: Path) -> None:
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored
    if saved["architecture"] == current["architecture"]:
        if None in (saved["weights"], current["weights"]) or saved["weights"] == current["weights"]:
            return
        difference = "same architecture, different weights"
    else:
        difference = "different architecture"
    raise ValueError(f"{path} was made with another model: snapshot model {_describe(saved)}, this is "
                     f"{_describe(current)} ({difference}); load it with the model that made it")


DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size")


def _field(path: Path, name: str, value, kind: type, minimum: int | None = None, optional: bool = False):
    """A header field of the right type (bools are not integers) and range, or a ValueError naming it."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{path} is damaged: its header field {name} is {value!r}, expected {kind.__name__}{bound}"
                         f"{' or null' if optional else ''}; save it again")
    return value


def _read_meta(header: dict, path: Path, tensors: int) -> dict:
    """The snapshot's metadata, every field checked (types, ranges, agreement with the `tensors` the file
    holds) before anything is allocated: a tampered header is refused naming the field."""
    if header.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a memory snapshot (format {header.get('format')!r}, "
                         f"expected {SNAPSHOT_FORMAT!r}); give a file from save_memory")
    if header.get("version") not in [str(v) for v in READABLE_VERSIONS]:
        raise ValueError(f"{path} is snapshot version {header.get('version')}, this build reads version(s) "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; use the build that wrote it")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path} has no readable snapshot metadata ({exc!r}); save it again") from None
    _field(path, "meta", meta, dict)
    missing = {"model", "dtype", "num_layers", "kv_heads", "head_dim", "stream"} - set(meta)
    if missing:
        raise ValueError(f"{path} snapshot metadata lacks {sorted(missing)}; save it again")
    model = _field(path, "model", meta["model"], dict)
    _field(path, "model.name", model.get("name"), str)
    architecture = _field(path, "model.architecture", model.get("architecture"), dict)
    for name in ARCHITECTURE_FIELDS:
        _field(path, f"model.architecture.{name}", architecture.get(name), int, 1)
    _field(path, "model.weights", model.get("weights"), str, optional=True)
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{path} is damaged: its header field dtype is {meta['dtype']!r}, expected one of "
                         f"{', '.join(DTYPES)}; save it again")
    layers = _field(path, "num_layers", meta["num_layers"], int, 1)
    # far more layers than tensors is refused before any per-layer work (a missing few are named later)
    per_layer = len(tensor_fields(header["version"]))
    if layers != architecture["num_hidden_layers"] or layers * per_layer > tensors + per_layer:
        raise ValueError(f"{path} is damaged: its header says {layers} layers of a "
                         f"{architecture['num_hidden_layers']}-layer model, and the file holds {tensors} tensors "
                         f"({per_layer} per layer); save it again")
    _field(path, "kv_heads", meta["kv_heads"], int, 1)
    _field(path, "head_dim", meta["head_dim"], int, 1)
    stream = _field(path, "stream", meta["stream"], dict)
    if header["version"] == "1":  # before evictions by age: every token counts as the stream's first chunk's
        stream.update(age_power=stream.get("age_power", 1.0), max_positions=None, time_shift=0)
    if header["version"] in ("1", "2"):  # every chunk's report was kept: the history is read from them
        stream.update(records=KVMemory.records, history=_history(path, stream.get("chunks"), layers))
    stream.setdefault("recall", 0)  # written before a memory could keep evicted tokens on the host
    stream.setdefault("host_budget", None)
    stream.setdefault("tier_growth", 0.0)  # written before tiered compaction
    stream.setdefault("focus", 0)  # written before a question could read only the chunks it attends to
    differing = set(stream) ^ set(STREAM_FIELDS)
    if differing:
        raise ValueError(f"{path} stream fields differ from this build's KVMemory in {sorted(differing)}; "
                         "load it with the build that wrote it")
    _field(path, "stream.budget", stream["budget"], int, 1, optional=True)
    power = _field(path, "stream.age_power", stream["age_power"], float)
    try:
        check_age_power(power)
    except ValueError as exc:
        raise ValueError(f"{path} is damaged: its header field stream.age_power: {exc}; save it again") from None
    _field(path, "stream.video_start", stream["video_start"], int, 0, optional=True)
    _field(path, "stream.max_positions", stream["max_positions"], int, 1, optional=True)
    _field(path, "stream.recall", stream["recall"], int, 0)
    _field(path, "stream.focus", stream["focus"], int, 0)
    _field(path, "stream.host_budget", stream["host_budget"], int, 1, optional=True)
    try:
        check_tier_growth(_field(path, "stream.tier_growth", stream["tier_growth"], float))
    except ValueError as exc:
        raise ValueError(f"{path} is damaged: its header field stream.tier_growth: {exc}; save it again") from None
    for name in ("next_position", "temporal_groups", "frames", "full_tokens", "evicted", "time_shift"):
        _field(path, f"stream.{name}", stream[name], int, 0)
    grid = _field(path, "stream.grid_hw", stream["grid_hw"], list, optional=True)
    if grid is not None and not (len(grid) == 2 and all(_field(path, "stream.grid_hw", v, int, 1) for v in grid)):
        raise ValueError(f"{path} is damaged: its header field stream.grid_hw is {grid!r}, expected [rows, columns]; "
                         "save it again")
    fps = _field(path, "stream.fps", stream["fps"], float, optional=True)
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"{path} is damaged: its header field stream.fps is {fps!r}, expected a rate > 0; "
                         "save it again")
    chunks = _field(path, "stream.chunks", stream["chunks"], list)
    if not all(isinstance(chunk, dict) for chunk in chunks):
        raise ValueError(f"{path} is damaged: its header field stream.chunks holds a non-object; save it again")
    _field(path, "stream.records", stream["records"], int, 1)
    history = _field(path, "stream.history", stream["history"], dict)
    if set(history) != set(HISTORY) or len({len(_field(path, f"stream.history.{name}", history[name], list))
                                            for name in HISTORY}) != 1:
        raise ValueError(f"{path} is damaged: its header field stream.history needs the lists {', '.join(HISTORY)}, "
                         "one number per chunk each; save it again")
    for name in HISTORY:  # counts; `kept` less the text may go below 0 for a policy that drops prompt text
        if not all(isinstance(v, int) and not isinstance(v, bool) and (v >= 0 or name == "kept")
                   for v in history[name]):
            raise ValueError(f"{path} is damaged: its header field stream.history.{name} holds a value that is not "
                             "a count; save it again")
    return meta


def _history(path: Path, chunks, layers: int) -> dict:
    """The history of a version 1 or 2 snapshot, from its chunk reports (it kept every one)."""
    history = {name: [] for name in HISTORY}
    for record in chunks if isinstance(chunks, list) else []:
        try:
            video = int(record.get("video_tokens", record["tokens"]))
            text = int(record["tokens"]) - video
            values = (int(record["frames"]), video, text, sum(int(k) for k in record["kept"]) - text * layers)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path} is damaged: a chunk report of its header lacks frames, tokens or kept; save it "
                             "again") from None
        for name, value in zip(HISTORY, values):
            history[name].append(value)
    return history


def _check_layer(layer: LayerMemory, index: int, meta: dict, path: Path) -> None:
    heads, m, dim = meta["kv_heads"], layer.importance.shape[-1], meta["head_dim"]
    keys = ((1, heads, m, dim), getattr(torch, meta["dtype"]))
    expected = dict(keys=keys, values=keys, positions=((heads, m, 3), torch.int64),
                    importance=((heads, m), torch.float32), chunk=((heads, m), torch.int64),
                    rank=((heads, m), torch.float32), level=((heads, m), torch.float32))
    for name, (shape, dtype) in expected.items():
        tensor = getattr(layer, name)
        if (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
            raise ValueError(f"{path} is damaged: layers.{index}.{name} is {tuple(tensor.shape)} {tensor.dtype}, "
                             f"its metadata says {shape} {dtype}; save it again")
    chunks = len(meta["stream"]["history"]["frames"])
    if m and not 0 <= int(layer.chunk.min()) <= int(layer.chunk.max()) < max(chunks, 1):
        raise ValueError(f"{path} is damaged: layers.{index}.chunk names a chunk outside the stream's {chunks}; "
                         "save it again")


def _layer(keys, values, positions, importance, chunk=None, rank=None, level=None) -> LayerMemory:
    """A stored layer; a version-1 file's tokens all count as chunk 0, ranked by their score among them all; before
    version 4 no token has a JS level (inf: tiered compaction treats them as rank x age alone does)."""
    if chunk is None:
        chunk, rank = torch.zeros(importance.shape, dtype=torch.int64), chunk_ranks(importance)
    if level is None:
        level = torch.full(importance.shape, float("inf"))
    return LayerMemory(keys, values, positions, importance, chunk, rank, level)


def read_snapshot_meta(path) -> dict:
    """A snapshot's metadata (model identity, config, stream fields) without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory snapshot at {str(path)!r}; give the path save_memory wrote")
    try:
        with safe_open(path, framework="pt") as f:
            return _read_meta(f.metadata() or {}, path, len(f.keys()))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc}); give a file from save_memory") from None


def load_memory(path, identity: dict | None, device="cpu", dtype=None) -> tuple[KVMemory, dict]:
    """Read a snapshot; returns the memory on `device` (keys/values cast to `dtype` if given) and its metadata.

    `identity` (the engine's model_identity) must match the model that saved it; None skips that check.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory snapshot at {str(path)!r}; give the path save_memory wrote")
    try:
        with safe_open(path, framework="pt") as f:  # reads the header now, tensors only on request
            meta = _read_meta(f.metadata() or {}, path, len(f.keys()))
            if identity is not None:
                _check_model(meta["model"], identity, path)
            fields = tensor_fields(f.metadata()["version"])
            names = [[f"layers.{i}.{name}" for name in fields] for i in range(meta["num_layers"])]
            missing = sorted({name for layer in names for name in layer} - set(f.keys()))
            if missing:
                raise ValueError(f"{path} is damaged: tensors {', '.join(missing[:4])} are missing; save it again")
            layers = [_layer(*(f.get_tensor(name) for name in layer)) for layer in names]
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc}); give a file from save_memory") from None
    for i, layer in enumerate(layers):
        _check_layer(layer, i, meta, path)
        layer.keys, layer.values = layer.keys.to(device, dtype), layer.values.to(device, dtype)
        for name in ("positions", "importance", "chunk", "rank", "level"):
            setattr(layer, name, getattr(layer, name).to(device))
    stream = dict(meta["stream"])
    try:
        stream["chunks"] = [ChunkRecord.from_dict(record) for record in stream["chunks"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is damaged: a chunk report of its header is incomplete ({exc}); save it again") \
            from None
    if stream["grid_hw"] is not None:
        stream["grid_hw"] = tuple(stream["grid_hw"])  # JSON has no tuples
    memory = KVMemory(layers=layers, **stream)
    memory.reset_host()
    return memory, meta
