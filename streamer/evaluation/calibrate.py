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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from memory.baselines import FullPolicy, LayerAblation
from memory.probe import GENERIC_PROMPTS, ProbeConfig, js_divergence
from streamer.config import find_config, load_config
from streamer.engine.decode import EagerDecoder
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video

SPREAD = 20.0  # the most needed layer's weight over the least's, at most (the shipped profile's layer_beta)


@torch.inference_mode()
def layer_js(runner: Runner, frames: Sequence[np.ndarray], chunk_frames: int, probe: ProbeConfig, ratio: float,
             prompts: Sequence[str] = GENERIC_PROMPTS, answer_tokens: int = 16, fps: float | None = None,
             progress: Callable[[str], None] | None = None) -> list[float]:
    """Per layer, the mean over `prompts` and the full context's answer positions of the JS (nats) between the
    video streamed with that layer alone pruned to `ratio` and the full context."""
    decoder = EagerDecoder(runner)

    def along(memory, ids: list[int], rows: int) -> torch.Tensor:  # logits of the last `rows` tokens of ids
        return decoder.probe(memory.context(), memory.next_position, ids, rows=rows).reference

    full = ingest_video(runner, frames, FullPolicy(), chunk_frames, fps=fps)
    answers = []
    for prompt in prompts:
        answer = runner.answer(full, prompt, max_new_tokens=answer_tokens).token_ids
        ids = runner.suffix_ids(prompt) + answer
        answers.append((ids, len(answer) + 1, along(full, ids, len(answer) + 1)))
    divergences = []
    for layer in range(runner.num_layers):
        pruned = ingest_video(runner, frames, LayerAblation(layer=layer, ratio=ratio, probe=probe), chunk_frames,
                              fps=fps)
        divergences.append(float(np.mean([js_divergence(reference, along(pruned, ids, rows))
                                          for ids, rows, reference in answers])))
        if progress:
            progress(f"layer {layer}: JS {divergences[-1]:.4f} with it alone pruned to {ratio:g}")
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


def write_config(base: str, weights: Sequence[float], out: Path, note: str) -> None:
    """`base` (a config name or file) with [emloc] layer_weights set to `weights`, written to `out`; the
    result is checked by loading it."""
    lines = find_config(base).read_text().splitlines()
    line = f"layer_weights = [{', '.join(f'{w:g}' for w in weights)}]  # {note}"
    lines = [text for text in lines if not text.startswith("layer_weights")]
    if "[emloc]" in lines:
        lines.insert(lines.index("[emloc]") + 1, line)
    else:
        lines += ["", "[emloc]", line]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    config = load_config(str(out))
    if config.policies.get("emloc", {}).get("layer_weights") != list(weights):
        raise ValueError(f"{out}: the written layer_weights did not read back")
