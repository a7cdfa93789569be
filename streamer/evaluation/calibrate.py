"""Per-layer weights for the memory's layer profile, from a few of the user's own videos and no labels
(`streamer calibrate`).

How much a layer's memory matters to the answers differs from checkpoint to checkpoint (on the builtin,
pruning layer 0 alone costs 43 points and layers 4-7 nothing: docs/SYNTHETIC.md). The shipped default
spreads each chunk's ratio over the layers by PyramidKV's profile, a guess; this measures it instead. For
each video and layer: stream the video with that layer alone pruned to `ratio` of each chunk (probe-ranked,
the other layers whole) and compare the next-token distributions along the full context's own answer to a
few generic prompts (teacher-forced, as EMLoC's probe compares them) with the full context's: the mean
Jensen-Shannon divergence over the answer's positions. A layer whose pruning moves the answers more gets a larger
weight: w[l] = max(JS[l], max(JS) / spread), scaled to a mean of 1, so a layer keeps r x w[l] of a chunk
when the search chooses r (emloc `layer_weights`), and none less than 1/spread of the most needed.

Single-layer JS alone can mislead (on the builtin, weights from it lost 13-22 points to the shipped profile:
what a generic description needs is not what the questions need), so the written profile is the one of
several whole profiles (the base config's, PyramidKV's at other steepness, the JS weights and flatter ones)
whose memory, at the same size, moves the answers least: each keeps its ratios of every chunk, and the answer
JS against the full context decides. The base's own profile wins ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from memory.baselines import FullPolicy, LayerRatios
from memory.emloc import EmlocPolicy
from memory.probe import GENERIC_PROMPTS, ProbeConfig, js_divergence
from streamer.config import find_config, load_config
from streamer.engine.decode import EagerDecoder
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video

SPREAD = 20.0  # the most needed layer's weight over the least's, at most (the shipped profile's layer_beta)


class AnswerJS:
    """The full context's own answers to `prompts` on one video, and how far a memory built by another policy
    moves the next-token distributions along them: the mean JS (nats) over the prompts and the answers'
    positions (teacher-forced, as EMLoC's probe compares them)."""

    @torch.inference_mode()
    def __init__(self, runner: Runner, frames: Sequence[np.ndarray], chunk_frames: int,
                 prompts: Sequence[str] = GENERIC_PROMPTS, answer_tokens: int = 16, fps: float | None = None):
        self.runner, self.frames, self.chunk_frames, self.fps = runner, frames, chunk_frames, fps
        self.decoder = EagerDecoder(runner)
        full = ingest_video(runner, frames, FullPolicy(), chunk_frames, fps=fps)
        self.answers = []
        for prompt in prompts:
            answer = runner.answer(full, prompt, max_new_tokens=answer_tokens).token_ids
            ids = runner.suffix_ids(prompt) + answer
            self.answers.append((ids, len(answer) + 1, self._along(full, ids, len(answer) + 1)))

    def _along(self, memory, ids: list[int], rows: int) -> torch.Tensor:  # logits of the last `rows` tokens of ids
        return self.decoder.probe(memory.context(), memory.next_position, ids, rows=rows).reference

    @torch.inference_mode()
    def of(self, policy) -> float:
        memory = ingest_video(self.runner, self.frames, policy, self.chunk_frames, fps=self.fps)
        return float(np.mean([js_divergence(reference, self._along(memory, ids, rows))
                              for ids, rows, reference in self.answers]))


def layer_js(judge: AnswerJS, probe: ProbeConfig, ratio: float,
             progress: Callable[[str], None] | None = None) -> list[float]:
    """Per layer, the answer JS with that layer alone pruned to `ratio` of each chunk."""
    alone = {f"layer {layer} alone at {ratio:g}": {layer: ratio} for layer in range(judge.runner.num_layers)}
    return list(profile_js(judge, probe, alone, progress).values())


def profile_js(judge: AnswerJS, probe: ProbeConfig, profiles: dict[str, list[float] | dict[int, float]],
               progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Per named profile (what each layer keeps of a chunk: a list, or {layer: ratio} with the others whole),
    the answer JS of a memory that keeps just that: profiles of the same size compared on how they spend it."""
    divergences = {}
    for name, ratios in profiles.items():
        layer_ratios = ratios if isinstance(ratios, dict) else dict(enumerate(ratios))
        divergences[name] = judge.of(LayerRatios(layer_ratios=layer_ratios, probe=probe))
        if progress:
            progress(f"{name}: JS {divergences[name]:.4f}")
    return divergences


def layer_weights(divergences: Sequence[float], spread: float = SPREAD) -> list[float]:
    """JS per layer -> weights with a mean of 1: proportional to the JS, but none below max / spread."""
    if not divergences or not all(math.isfinite(j) and j >= 0 for j in divergences):
        raise ValueError(f"need one finite JS >= 0 per layer, got {list(divergences)}")
    top = max(divergences)
    if top == 0:  # no layer's pruning moved the answers: nothing to tell them apart
        return [1.0] * len(divergences)
    floored = [max(j, top / spread) for j in divergences]
    mean = sum(floored) / len(floored)
    return [round(w / mean, 4) for w in floored]


BETAS = (1.0, 5.0, 50.0)  # PyramidKV's profile at other steepness than the base's (1: every layer alike)
EXPONENTS = (1.0, 0.5)  # weights proportional to the layer JS, and flatter: to its square root


def candidate_profiles(base: EmlocPolicy, divergences: Sequence[float], spread: float = SPREAD) -> dict[str, dict]:
    """Whole layer profiles to choose among, as the emloc options that give them: the base config's own
    ("base", no change), PyramidKV's at BETAS, and weights from the layer JS (at EXPONENTS)."""
    candidates = {"base": {}}
    for beta in BETAS:
        if base.layer_weights or beta != base.layer_beta:
            candidates[f"pyramid {beta:g}"] = dict(layer_beta=beta, layer_weights=[])
    for exponent in EXPONENTS:
        candidates[f"layer JS^{exponent:g}"] = dict(layer_weights=layer_weights([j ** exponent for j in divergences],
                                                                               spread))
    return candidates


def profile_ratios(base: EmlocPolicy, options: dict, ratio: float, layers: int) -> list[float]:
    """What each layer keeps of a chunk under the profile `options` give, when the search chooses `ratio`."""
    return replace(base, **options).profile(ratio, layers)


def write_config(base: str, options: dict, out: Path, note: str) -> None:
    """`base` (a config name or file) with its [emloc] options replaced by `options` (layer_weights,
    layer_beta; an empty list drops the line), written to `out`; the result is checked by loading it."""
    lines = find_config(base).read_text().splitlines()
    lines = [text for text in lines if not any(text.startswith(f"{key} ") or text.startswith(f"{key}=")
                                               for key in options)]
    if "[emloc]" not in lines:
        lines += ["", "[emloc]"]
    at = lines.index("[emloc]") + 1
    lines[at:at] = [f"# {note}"] + [f"{key} = {_toml(value)}" for key, value in options.items() if value != []]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    written = load_config(str(out)).policies.get("emloc", {})
    if any(written.get(key, []) != value for key, value in options.items()):
        raise ValueError(f"{out}: the written emloc options did not read back")


def _toml(value) -> str:
    return f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, list) else f"{value!r}"
