"""Packed forwards: several short, independent forwards over different contexts run as one.

A Segment is one forward as a session would run it alone: its tokens (or, for a probe re-run, the
stored hidden state entering layer `start`), their positions, the MemoryView it reads and extends,
and what it wants back (the logits of some rows, the attention it pays, the state entering each
layer). `run_segments` runs any number of them in ONE pass over the layers: their rows packed into
one sequence [1, T, hidden], so every weight matrix is read once for all of them, which is what a
forward bound by reading the weights (a GPU at these sizes, a CPU on a 2B model) pays for.

Attention cannot be packed that way: each segment attends to its own keys, whose number differs per
layer and per session. So the cache (Packed) writes each segment's new keys into that segment's own
view, and streamer.engine.attention runs one attention call per segment -- the call it makes alone,
with its own key masks and attention recorder. A segment's results are therefore the ones it gets
alone, up to the rounding of matrix products over more rows (float32: ~1e-7). Segments that start at
a higher layer (re-runs from a layer group's stored input) join the pass at that layer.

One segment alone takes Runner.forward_layers directly: the path every forward took before packing.
Users: the answers' steps (streamer.engine.generation.advance) and the probe forwards of chunks
ingested together (streamer.engine.together).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamer.engine.text_model import TextModel
from streamer.engine.view import MemoryView


@dataclass(eq=False)
class Segment:
    view: MemoryView  # the keys it attends to; its new keys are written after them
    positions: torch.Tensor  # [n, 3] absolute positions of its n tokens
    ids: list[int] | None = None  # its tokens; or
    hidden: torch.Tensor | None = None  # [1, n, hidden]: the state entering layer `start` (a probe re-run)
    start: int = 0  # the first layer it runs
    rows: list[int] = field(default_factory=list)  # the rows whose float32 logits come back
    key_masks: dict | None = None  # streamer.engine.attention's key_masks, for this segment's queries
    recorder: Callable | None = None  # its attention_recorder
    layer_inputs: list | None = None  # collects the hidden state entering each layer it runs

    @property
    def size(self) -> int:
        return self.positions.shape[0]


class Packed:
    """The cache of a packed forward: segment i (rows bounds[i] of the sequence) writes its new keys to its own
    view. `latest` holds, after each layer's update, every segment's full keys and values for
    streamer.engine.attention (which the `segments` argument names), `extras` each segment's own attention
    arguments (key_masks, attention_recorder)."""

    def __init__(self, views: list[MemoryView], sizes: list[int], extras: list[dict] | None = None):
        self.views = views
        ends = list(itertools.accumulate(sizes))
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.extras = extras or [{} for _ in views]
        self.latest: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.latest = [view.update(keys[:, :, a:b], values[:, :, a:b], layer_idx)
                       for view, (a, b) in zip(self.views, self.bounds)]
        return keys, values


def run_segments(runner: TextModel, segments: list[Segment]) -> list[torch.Tensor]:
    """Every segment's forward, in one pass over the layers; per segment the float32 logits [rows, vocab] of its
    `rows` (empty where it asked for none)."""
    if len(segments) == 1:
        return [_alone(runner, segments[0])]
    hiddens = [s.hidden if s.ids is None else None for s in segments]
    with_ids = [i for i, s in enumerate(segments) if s.ids is not None]
    if with_ids:  # one embedding lookup for all the token inputs
        embedded = runner.embed_tokens([t for i in with_ids for t in segments[i].ids])
        for i, part in zip(with_ids, embedded.split([segments[i].size for i in with_ids], dim=1)):
            hiddens[i] = part
    starts = sorted({s.start for s in segments}) + [runner.num_layers]
    active: list[int] = []
    for first, end in zip(starts, starts[1:]):
        active += [i for i, s in enumerate(segments) if s.start == first]  # those starting here join the pass
        members = [segments[i] for i in active]
        cache = Packed([s.view for s in members], [s.size for s in members],
                       [dict(key_masks=s.key_masks, attention_recorder=s.recorder) for s in members])
        layer_inputs = [] if any(s.layer_inputs is not None for s in members) else None
        hidden = runner.forward_layers(torch.cat([hiddens[i] for i in active], dim=1),
                                       torch.cat([s.positions for s in members]), cache, layers=range(first, end),
                                       layer_inputs=layer_inputs, segments=cache)
        parts = hidden.split([s.size for s in members], dim=1)
        for i, part in zip(active, parts):
            hiddens[i] = part
        for entering in layer_inputs or []:
            for s, part in zip(members, entering.split([s.size for s in members], dim=1)):
                if s.layer_inputs is not None:
                    s.layer_inputs.append(part)
    wanted = [(i, row) for i, s in enumerate(segments) for row in s.rows]
    if not wanted:
        return [hiddens[0].new_empty(0) for _ in segments]
    logits = runner.logits(torch.cat([hiddens[i][:, row] for i, row in wanted])[None])[0]
    return list(logits.split([len(s.rows) for s in segments]))


def _alone(runner: TextModel, s: Segment) -> torch.Tensor:
    extra = {}
    if s.key_masks is not None:
        extra["key_masks"] = s.key_masks
    if s.recorder is not None:
        extra["attention_recorder"] = s.recorder
    hidden = runner.embed_tokens(s.ids) if s.ids is not None else s.hidden
    hidden = runner.forward_layers(hidden, s.positions, s.view, layers=range(s.start, runner.num_layers),
                                   layer_inputs=s.layer_inputs, **extra)
    if not s.rows:
        return hidden.new_empty(0)
    return runner.logits(hidden[:, s.rows])[0]
