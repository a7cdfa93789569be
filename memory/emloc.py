"""EMLoC: per-chunk, group-wise retention ratios chosen under a Jensen-Shannon bound.

For each chunk (docs/DESIGN.md section 2): probe once with the chunk unpruned (importance scores,
reference logits, the hidden state entering every layer); then walk the layer groups from the
top down. For a group, every ratio is a candidate: it keeps the top-k tokens per KV head in each
layer of the group, with the choices already accepted above it in place, and is judged by
re-running the probe from the group's first layer on its stored hidden state -- exact, because the
groups below are still unpruned. All candidates of a group are re-run in one forward (the engine
packs them: a forward bound by reading the weights costs about the same for three as for one),
and the smallest ratio whose JS to the reference is <= delta is accepted; 1.0 is the fallback.
A stream's chunks mostly choose what the chunk before chose, so a group's candidates up to that
choice go first and the larger ones only if none of those passes: the same choice, from fewer rows
(on a CPU a forward of three candidates' rows costs nearly three times one's).

The fallback needs no forward: with the group unpruned the state is exactly the one in which
the group above was accepted, so its JS is that group's (0 for the top group). Hence every
recorded JS is <= delta, and the JS of the final choice is the JS recorded for the lowest group.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from memory.baselines import pyramid_ratios
from memory.policy import ChunkContext, ProbedPolicy, Selection, check_ratio
from memory.probe import js_divergence, keep_count, kept_indices, outlier_count, ratio_tokens


def layer_groups(num_layers: int, group_size: int) -> list[range]:
    return [range(start, min(start + group_size, num_layers)) for start in range(0, num_layers, group_size)]


@dataclass(kw_only=True)
class EmlocPolicy(ProbedPolicy):
    name = "emloc"
    delta: float = 0.04  # JS bound (nats) per chunk
    ratios: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.5, 1.0])  # tried smallest first
    group_size: int = 14  # layers per group (1 = layer-wise); the last group may be smaller
    js_reduce: str = "mean"  # over the compared probe positions: mean (the paper) or max (no position moves more)
    # > 0: a group's first candidate keeps the tokens the probe attends to more than this many times the chunk's
    # median token (memory.probe.outlier_count, mean over the group's layers), then the ratios above it are
    # tried; 0: the ratios only (the paper)
    outlier_factor: float = 0.0
    # 1: a candidate ratio keeps that ratio in every layer of its group (the paper). > 1: it is the mean over the
    # model's layers of PyramidKV's profile with this steepness (memory.baselines.pyramid_ratios), so lower layers
    # keep more; the search still chooses one ratio per group and chunk under the bound.
    layer_beta: float = 1.0
    # non-empty: one weight per layer instead of layer_beta's profile; layer l keeps r x w[l] / mean(w) (at most 1)
    layer_weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise ValueError(f"emloc delta must be a finite number >= 0, got {self.delta}")
        if not self.ratios:
            raise ValueError("emloc ratios must not be empty")
        for ratio in self.ratios:
            check_ratio("every emloc ratio", ratio)
        if self.group_size < 1:
            raise ValueError(f"emloc group_size must be >= 1, got {self.group_size}")
        if not (self.outlier_factor >= 0 and math.isfinite(self.outlier_factor)):
            raise ValueError(f"emloc outlier_factor must be a finite number >= 0 (0 = off), got {self.outlier_factor}")
        if self.js_reduce not in ("mean", "max"):
            raise ValueError(f"emloc js_reduce must be 'mean' or 'max', got {self.js_reduce!r}")
        if not all(w > 0 and math.isfinite(w) for w in self.layer_weights):
            raise ValueError(f"emloc layer_weights must be finite numbers > 0, got {self.layer_weights}")
        if not (self.layer_beta >= 1 and math.isfinite(self.layer_beta)):
            raise ValueError(f"emloc layer_beta must be a finite number >= 1 (1 = the same ratio in every layer), "
                             f"got {self.layer_beta}")

    def profile(self, ratio: float, num_layers: int) -> list[float]:
        """Per layer, the fraction a candidate `ratio` keeps."""
        if not self.layer_weights:
            return pyramid_ratios(ratio, self.layer_beta, num_layers)
        if len(self.layer_weights) != num_layers:
            raise ValueError(f"emloc layer_weights has {len(self.layer_weights)} weights for {num_layers} layers")
        mean = sum(self.layer_weights) / num_layers
        return [min(1.0, ratio * w / mean) for w in self.layer_weights]

    def select(self, ctx: ChunkContext) -> Selection:
        num_layers = ctx.model.num_layers
        start = time.perf_counter()
        runs, scores = self.probe_scores(ctx)
        probe_s = time.perf_counter() - start

        groups = layer_groups(num_layers, self.group_size)
        video_tokens = int((~ctx.protected).sum())
        grid = sorted(r for r in set(self.ratios) if r < 1.0)
        accepted = {}  # layer -> bool [kv_heads, chunk_len], pruned layers only
        # per layer, the lowest JS (over the bound) of a candidate that dropped each token: how far a tiered memory
        # may compact this chunk as its bound loosens with age (free: every candidate below the choice is run)
        levels = [torch.full_like(score, float("inf")) for score in scores] if self.delta > 0 else None
        ratios, js_values, evaluations = [1.0] * len(groups), [0.0] * len(groups), []
        js_above = 0.0
        previous = ctx.memory.chunks[-1].ratios if ctx.memory.chunks else None
        if previous is None or len(previous) != len(groups):
            previous = [1.0] * len(groups)  # no guess: every candidate at once
        for g in reversed(range(len(groups))):
            layers = groups[g]
            chosen, chosen_js = 1.0, js_above
            candidates = grid
            if self.outlier_factor:
                count = sum(outlier_count(scores[layer], ctx.protected, self.outlier_factor)
                            for layer in layers) / len(layers)
                first = round(count) / video_tokens
                candidates = [first, *(r for r in grid if r > first)]
            tried, tries = set(), []  # ratios that keep as many tokens in every layer as a smaller one are skipped
            for ratio in candidates:
                profile = self.profile(ratio, num_layers)
                counts = {layer: ratio_tokens(profile[layer], video_tokens) for layer in layers}
                if tuple(counts.values()) not in tried:
                    tried.add(tuple(counts.values()))
                    tries.append((ratio, {layer: keep_count(scores[layer], ctx.protected, counts[layer])
                                          for layer in layers}))
            guessed = max(1, sum(ratio <= previous[g] for ratio, _ in tries))
            for batch in (tries[:guessed], tries[guessed:]):
                js_sums = [0.0] * len(batch)
                for run in runs if batch else []:
                    for i, logits in enumerate(run.rerun(layers.start, [{**accepted, **keep} for _, keep in batch])):
                        js_sums[i] += js_divergence(run.reference, logits, self.js_reduce)
                js_means = [js_sum / len(runs) for js_sum in js_sums]
                for (ratio, candidate), js in zip(batch, js_means):
                    evaluations.append([g, ratio, js])
                    for layer, keep in candidate.items() if levels is not None else ():
                        levels[layer] = torch.where(keep, levels[layer], levels[layer].clamp(max=js / self.delta))
                passed = next(((ratio, candidate, js) for (ratio, candidate), js in zip(batch, js_means)
                               if js <= self.delta), None)
                if passed is not None:
                    chosen, candidate, chosen_js = passed
                    accepted.update(candidate)
                    break
            ratios[g], js_values[g] = chosen, chosen_js
            js_above = chosen_js
        search_s = time.perf_counter() - start - probe_s

        kept = [kept_indices(accepted[layer]) if layer in accepted else None for layer in range(num_layers)]
        if all(k is None for k in kept):
            kept = None
        else:
            all_tokens = kept_indices(keep_count(scores[0], ctx.protected, video_tokens))
            kept = [k if k is not None else all_tokens for k in kept]
        report = dict(ratios=ratios, js=js_values, groups=[[r.start, r.stop] for r in groups],
                      evaluations=evaluations)
        return Selection(kept, scores, report=report, timings=dict(probe=probe_s, search=search_s), levels=levels)
