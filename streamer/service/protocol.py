"""The websocket protocol's rules: error codes, limits, and the checks on what clients send.

Messages are JSON objects with a string "type" (README.md, "Websocket protocol"); every refusal
is a ProtocolError, sent as {"type": "error", "code": ..., "message": ...}. The options a
`start` message may set are the session options below plus the chosen policy's own fields
(memory.registry.policy_options), so a new policy option is a protocol option with no edit here.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from memory.registry import POLICIES, policies_with, policy_options
from streamer.config import Config, override
from video_io.images import MAX_IMAGE_PIXELS

MESSAGE_TYPES = ("start", "frame", "ingest", "flush", "ask", "cancel", "stats", "save", "load", "ping")
SESSION_OPTIONS = {  # start option -> (config section, key, type)
    "policy": ("memory", "policy", str),
    "chunk_frames": ("memory", "chunk_frames", int),
    "budget": ("memory", "budget", int),
    "age_power": ("memory", "age_power", float),
    "min_pixels": ("video", "min_pixels", int),
    "max_pixels": ("video", "max_pixels", int),
    "probe": ("probe", "mode", str),
    "fps": ("video", "fps", float),  # the rate the client's frames are sampled at (Qwen2.5-VL's positions follow it)
}
POLICY_OPTIONS = {name: kind for policy in POLICIES for name, kind in policy_options(policy).items()}


class Disconnected(Exception):
    """The client's connection is gone (raised by a Connection's recv and send)."""


class ProtocolError(Exception):
    """A refusal sent to the client as {"type": "error", "code": ..., "message": ...}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ServerLimits:
    max_sessions: int = 16
    max_frames_per_session: int = 100_000
    max_message_bytes: int = 8 * 2**20
    max_pending_frames: int = 0  # 0: four chunks' worth
    max_pending_bytes: int = 512 * 2**20  # of frames waiting per session (at model resolution), at least a chunk
    max_queued_chunks: int = 2
    max_questions: int = 4  # outstanding per session
    max_new_tokens: int = 512
    max_batch: int = 32  # answers of all sessions stepped together in one forward (1: one answer at a time)
    max_together: int = 8  # chunks of different sessions ingested together, probe forwards packed (1: one at a time)
    max_question_chars: int = 4000
    max_budget: int = 65536  # tokens per layer
    max_pixels: int = 768 * 32 * 32  # per frame after resize (the largest family default: Qwen3-VL's)
    max_frame_pixels: int = MAX_IMAGE_PIXELS  # per pushed JPEG/PNG as sent, checked from its header
    max_chunk_frames: int = 256  # a session's chunk_frames (waiting frames are bounded by 4 chunks)
    idle_timeout: float = 600.0  # seconds without a message before a session is closed
    start_timeout: float = 30.0  # seconds a connection may stay open without starting a session
    max_unstarted: int = 16  # connections open at once without a session (they do not count as sessions)
    overflow: str = "subsample"  # what to do with frames beyond max_pending_frames: subsample | drop
    allowed_roots: list[Path] = field(default_factory=list)  # server-side files are read/written only here
    allow_urls: bool = False  # let clients make the server open network streams
    token: str | None = None  # bearer token required at connect


def error(code: str, message: str, **extra) -> dict:
    return dict(type="error", code=code, message=message, **extra)


def read_json(message: str):
    """json.loads, with every way it can refuse a text as bad_json: besides JSONDecodeError, an
    integer of thousands of digits is a ValueError and deep nesting a RecursionError."""
    try:
        return json.loads(message)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"message is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"message is not JSON this server reads ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None


def parse_message(message: str) -> dict:
    request = read_json(message)
    if not isinstance(request, dict) or not isinstance(request.get("type"), str):
        raise ProtocolError("bad_message", 'a message must be a JSON object with a string "type"')
    return request


def refused(message) -> dict:
    """What a refusal names of the message it refuses, so that the client gives it to that request and no other:
    `request`, "frame" for an image, else the message's "type"; and an ask's `id`."""
    if isinstance(message, bytes):
        return dict(request="frame")
    try:
        request = read_json(message)
    except ProtocolError:
        return dict(request=None)
    if not isinstance(request, dict):
        return dict(request=None)
    kind = request.get("type")
    fields = dict(request=kind if isinstance(kind, str) else None)
    if request.get("id") is not None:
        fields["id"] = request["id"]
    return fields


def number(request: dict, key: str, minimum: float, maximum: float | None = None, integer: bool = False,
           default=None):
    """request[key] as a number within [minimum, maximum] (None if absent and no default)."""
    value = request.get(key)
    if value is None:  # absent, or null
        value = default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ProtocolError("bad_option", f"{key!r} must be a{'n integer' if integer else ' number'}, got {value!r}")
    if not math.isfinite(value):
        raise ProtocolError("bad_option", f"{key!r} must be a finite number, got {value}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ProtocolError("bad_option", f"{key!r} must be {bounds}, got {value}")
    return value


def typed(name: str, value, kind):
    """A JSON option checked against its declared type (bools are not numbers here)."""
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            raise ProtocolError("bad_option", f"option {name!r} must be a list of finite numbers")
        return [float(v) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError("bad_option", f"option {name!r} must be of type {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ProtocolError("bad_option", f"option {name!r} must be a finite number, got {value}")
    return value


def session_config(defaults: Config, options: dict, limits: ServerLimits) -> Config:
    """The server's default config with a client's `start` options on top, within the limits."""
    options = {name: value for name, value in options.items() if name != "type"}
    unknown = sorted(set(options) - set(SESSION_OPTIONS) - set(POLICY_OPTIONS))
    if unknown:
        raise ProtocolError("bad_option", f"unknown start option(s) {unknown}; known: "
                            f"{sorted([*SESSION_OPTIONS, *POLICY_OPTIONS])}")
    config = replace(defaults, memory=replace(defaults.memory), video=replace(defaults.video),
                     probe=replace(defaults.probe), policies={k: dict(v) for k, v in defaults.policies.items()})
    for name, value in options.items():
        if name in SESSION_OPTIONS:
            section, key, kind = SESSION_OPTIONS[name]
            override(config, section, **{key: typed(name, value, kind)})
    if "fps" in options:
        if not config.video.fps > 0:
            raise ProtocolError("bad_option", f"option 'fps' must be > 0, got {config.video.fps}")
        config.video.frames = None  # a session's frames come at a rate, not as a count
    policy = config.memory.policy
    if policy not in POLICIES:
        raise ProtocolError("bad_option", f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    own = policy_options(policy)
    for name, value in options.items():
        if name in SESSION_OPTIONS:
            continue
        if name not in own:
            raise ProtocolError("bad_option", f"{name!r} applies to {', '.join(policies_with(name))}, not {policy}")
        override(config, policy, **{name: typed(name, value, own[name])})
    if config.probe.mode != "generic":
        raise ProtocolError("bad_option", "a live session needs the generic probe: its memory must serve "
                            "questions that are not known yet")
    if (config.video.max_pixels or 0) > limits.max_pixels:
        raise ProtocolError("bad_option", f"max_pixels {config.video.max_pixels} is over this server's limit "
                            f"{limits.max_pixels}")
    if config.memory.chunk_frames > limits.max_chunk_frames:
        raise ProtocolError("bad_option", f"chunk_frames {config.memory.chunk_frames} is over this server's limit "
                            f"{limits.max_chunk_frames}")
    if "budget" in options and not 0 < config.memory.budget <= limits.max_budget:
        raise ProtocolError("bad_option", f"budget must be between 1 and {limits.max_budget} tokens per layer")
    # no session's memory is unbounded: a server config without a budget gives its sessions the limit
    config.memory.budget = min(config.memory.budget or limits.max_budget, limits.max_budget)
    try:
        return config.validate()
    except (ValueError, TypeError) as exc:
        raise ProtocolError("bad_option", str(exc)) from None
