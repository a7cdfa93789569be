"""EMLoC and the baseline policies on the tiny model (float32; the pruning, policy and budget tests on a tiny
model of each family), against full recomputations."""

import copy
import math

import pytest
import torch
from conftest import FAMILY_FPS, question_logits, random_frames, stream
from reference import one_shot_logits

from memory.baselines import FullPolicy, pyramid_ratios
from memory.emloc import EmlocPolicy, layer_groups
from memory.policy import ChunkContext
from memory.probe import ProbeConfig, js_divergence, keep_count
from memory.registry import POLICIES, make_policy, policies_with
from memory.store import KVMemory, chunk_stretches, coverage
from streamer.engine.positions import text_positions
from streamer.engine.probing import ChunkProbes
from streamer.engine.view import MemoryView

QUESTION = "What happens in the video?"
PROBE = ProbeConfig(js_positions=4, answer_tokens=3)


def emloc(delta, ratios=(0.1, 0.5, 1.0), group_size=2, probe=PROBE):
    return EmlocPolicy(delta=delta, ratios=list(ratios), group_size=group_size, probe=probe)


def kept_mask_reference(runner, memory, full_memory):
    """key_mask for reference.one_shot_logits from the positions each layer and head kept."""
    all_positions = full_memory.layers[0].positions[0]  # [N, 3]; unique per token in this stream
    chunk_of = torch.cat([torch.full((report.tokens,), c) for c, report in enumerate(memory.chunks)])

    def kept(layer, head):
        mine = memory.layers[layer].positions[head]
        return (all_positions[:, None, :] == mine[None, :, :]).all(-1).any(1)

    def key_mask(layer, seq):
        heads, n = runner.kv_heads, len(chunk_of)
        key_chunk = torch.cat([chunk_of, torch.full((seq - n,), -1)])
        visible = torch.ones(heads, seq, dtype=torch.bool)
        for head in range(heads):
            visible[head, :n] = kept(layer, head)
        same_chunk = key_chunk[:, None].eq(key_chunk[None, :]) & key_chunk[:, None].ge(0)
        return visible[:, None, :] | same_chunk[None]

    return key_mask


def test_delta_zero_keeps_the_full_context(tiny_runner):
    frames = random_frames(8, seed=4)
    full = stream(tiny_runner, frames, 4, FullPolicy())
    for policy in (emloc(0.0), emloc(0.5, ratios=[1.0])):
        memory = stream(tiny_runner, frames, 4, policy)
        assert memory.tokens_per_layer() == full.tokens_per_layer()
        assert all(ratio == 1.0 for chunk in memory.chunks for ratio in chunk.ratios)
        torch.testing.assert_close(question_logits(tiny_runner, memory, QUESTION),
                                   question_logits(tiny_runner, full, QUESTION), atol=1e-5, rtol=0)


def test_delta_one_takes_the_smallest_ratio_everywhere(tiny_runner):
    frames = random_frames(8, seed=5)
    memory = stream(tiny_runner, frames, 4, emloc(1.0, ratios=[0.1, 0.5, 1.0]))
    for chunk in memory.chunks:
        assert chunk.ratios == [0.1] * 3
        video_tokens = 2 * 8  # 2 frame pairs of 8 tokens
        protected = chunk.tokens - video_tokens
        assert chunk.kept == [math.ceil(0.1 * video_tokens) + protected] * tiny_runner.num_layers


@pytest.mark.parametrize("group_size", [1, 2, 4, 6])
def test_group_search_order_and_shared_ratios(tiny_runner, group_size):
    frames = random_frames(8, seed=6)
    policy = emloc(0.01, ratios=[0.05, 0.2, 0.6, 1.0], group_size=group_size)
    memory = stream(tiny_runner, frames, 4, policy)
    groups = layer_groups(tiny_runner.num_layers, group_size)
    assert [len(g) for g in groups] == [group_size] * (6 // group_size) + ([6 % group_size] if 6 % group_size else [])
    for chunk in memory.chunks:
        assert len(chunk.ratios) == len(groups)
        order = [g for g, _, _ in chunk.chosen["evaluations"]]
        assert order == sorted(order, reverse=True), "groups are searched top-down"
        for g, layers in enumerate(groups):
            assert len({chunk.kept[layer] for layer in layers}) == 1, "a group shares one ratio"
            tried = [ratio for gg, ratio, _ in chunk.chosen["evaluations"] if gg == g]
            assert tried == sorted(tried), "ratios are tried smallest first"
        for js, ratio in zip(chunk.js, chunk.ratios):
            assert js <= 0.01
        for g, ratio, js in chunk.chosen["evaluations"]:  # every candidate, evaluated together: the smallest within delta won
            assert js > 0.01 if ratio < chunk.ratios[g] else (ratio > chunk.ratios[g] or js <= 0.01)


@pytest.mark.parametrize("delta", [0.005, 0.02])
def test_candidates_up_to_the_previous_choice_first_choose_as_all_at_once(tiny_runner, delta):
    """A group's candidates up to the previous chunk's choice are re-run first, the larger ones only if none
    passes: every chunk chooses what re-running every candidate at once chooses."""
    frames = random_frames(28, seed=13)
    policy = emloc(delta, ratios=[0.05, 0.2, 0.6, 1.0], group_size=2)
    guessed = stream(tiny_runner, frames, 4, policy)
    every, every_choices = tiny_runner.new_memory(), []
    for start in range(0, len(frames), 4):
        every_choices.append(tiny_runner.ingest(every, frames[start:start + 4], policy).ratios)
        every.chunks[-1].chosen = dict(every.chunks[-1].chosen, ratios=[1.0] * 3)  # the next chunk has no guess
    choices = [c.ratios for c in guessed.chunks]
    assert any(a != b for a, b in zip(choices, choices[1:])), "the test needs guesses that miss"
    assert choices == every_choices
    for a, b in zip(guessed.chunks, every.chunks):
        assert a.kept == b.kept
        tried = {(g, ratio): js for g, ratio, js in a.chosen["evaluations"]}
        assert tried.items() <= {(g, ratio): pytest.approx(js, abs=1e-6)
                                 for g, ratio, js in b.chosen["evaluations"]}.items()
    assert sum(len(c.chosen["evaluations"]) for c in guessed.chunks) < sum(
        len(c.chosen["evaluations"]) for c in every.chunks), "the guesses should have saved re-runs"


def test_recorded_js_matches_a_recomputation_from_scratch(tiny_runner):
    """The JS recorded for the lowest group is the JS of the final choice: recompute it with plain
    forwards of the probe over the committed memory vs. over the unpruned memory."""
    frames = random_frames(8, seed=7)
    policy = emloc(0.05, ratios=[0.1, 0.3, 1.0], group_size=2)
    before = stream(tiny_runner, frames[:4], 4, policy)
    unpruned, pruned = copy.deepcopy(before), copy.deepcopy(before)
    tiny_runner.ingest(unpruned, frames[4:], FullPolicy())
    report = tiny_runner.ingest(pruned, frames[4:], policy)
    assert any(r < 1.0 for r in report.ratios), "the test needs some pruning"

    ids = tiny_runner.suffix_ids(PROBE.prompts[0])
    for _ in range(PROBE.answer_tokens):  # the probe's greedy continuation, on the unpruned memory
        ids.append(int(probe_logits(tiny_runner, unpruned, ids, 1)[-1].argmax()))
    reference = probe_logits(tiny_runner, unpruned, ids, PROBE.js_positions)
    final = probe_logits(tiny_runner, pruned, ids, PROBE.js_positions)
    assert js_divergence(reference, final) == pytest.approx(report.js[0], abs=1e-5)
    assert max(report.js) <= 0.05


@torch.inference_mode()
def probe_logits(runner, memory, ids, last):
    view = MemoryView(memory.context(), extra=len(ids))
    hidden = runner.forward_layers(runner.embed_tokens(ids), text_positions(memory.next_position, len(ids)), view)
    return runner.logits(hidden[:, -last:])[0]


def test_pruned_memory_answers_exactly_like_a_masked_full_forward(family_runner):
    """Kept tokens keep their positions and the question continues at next_position, not at the
    cache length: the answer logits equal one full forward that hides exactly the pruned tokens."""
    frames = random_frames(8, seed=8)
    full = stream(family_runner, frames, 4, FullPolicy(), fps=FAMILY_FPS)
    memory = stream(family_runner, frames, 4, emloc(0.05, ratios=[0.1, 0.3, 1.0], group_size=2), fps=FAMILY_FPS)
    assert memory.mean_tokens() < full.mean_tokens()
    assert memory.next_position == full.next_position
    for layer, full_layer in zip(memory.layers, full.layers):  # kept positions are a subset, in order
        for head in range(family_runner.kv_heads):
            mine = layer.positions[head]
            assert torch.all(mine[1:, 0] >= mine[:-1, 0])
            assert all((full_layer.positions[head] == p).all(-1).any() for p in mine)
    key_mask = kept_mask_reference(family_runner, memory, full)
    reference = one_shot_logits(family_runner, frames, QUESTION, key_mask=key_mask, fps=FAMILY_FPS)
    torch.testing.assert_close(question_logits(family_runner, memory, QUESTION), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_runs_and_keeps_prompt_text(family_runner, name):
    frames = random_frames(8, seed=9)
    options = {"ratio": 0.25} if name in policies_with("ratio") else {}
    if name == "emloc":
        options = {"delta": 0.05, "ratios": [0.25, 1.0], "group_size": 3}
    if name == "recent":
        options = {"frames": 2}
    policy = make_policy(name, options, PROBE)
    memory = stream(family_runner, frames, 4, policy, fps=FAMILY_FPS)
    prefix = len(family_runner.prefix_ids)
    for layer in memory.layers:  # the prompt text (positions 0..prefix-1) is in every layer and head
        for head_positions in layer.positions:
            assert head_positions[:prefix, 0].tolist() == list(range(prefix))
    answer = family_runner.answer(memory, QUESTION, max_new_tokens=3)
    assert len(answer.token_ids) >= 1
    if name == "full":
        assert memory.mean_tokens() == memory.full_tokens
    elif name != "emloc":
        text = int(torch.isinf(memory.layers[0].importance[0]).sum())  # prompt text (Qwen3-VL: frame text too)
        assert memory.mean_tokens() - text < 0.6 * (memory.full_tokens - text)


def test_uniform_and_pyramid_spend_the_same_total(tiny_runner):
    frames = random_frames(4, seed=10)
    ratios = pyramid_ratios(0.3, 20.0, 6)
    assert ratios == sorted(ratios, reverse=True) and sum(ratios) / 6 == pytest.approx(0.3)
    totals = {}
    for name in ("uniform", "pyramid"):
        memory = stream(tiny_runner, frames, 4, make_policy(name, {"ratio": 0.3}, PROBE))
        totals[name] = sum(memory.tokens_per_layer())
    assert abs(totals["uniform"] - totals["pyramid"]) <= 6  # per-layer ceil rounding


@pytest.mark.parametrize("name", ["full", "window", "emloc"])
def test_budget_is_never_exceeded_over_a_long_stream(family_runner, name):
    options = {"delta": 0.05, "ratios": [0.25, 1.0], "group_size": 3} if name == "emloc" else {}
    policy = make_policy(name, options, ProbeConfig(js_positions=2, answer_tokens=1))
    budget = 48  # Qwen3-VL's frame text (time and vision tokens) goes with its chunk: the same budget serves it
    memory = family_runner.new_memory(budget=budget)
    frames = random_frames(100, seed=11)
    for chunk in range(50):
        report = family_runner.ingest(memory, frames[2 * chunk:2 * chunk + 2], policy)
        assert sum(memory.tokens_per_layer()) <= budget * family_runner.num_layers  # the layers share the budget
        newest = memory.layers[0].positions[0][-report.kept[0]:]
        if family_runner.family.timestamps:  # the chunk ends with its pair's <|vision_end|>
            time = memory.next_position - 1
        else:
            time = memory.video_start + int(chunk * family_runner.pair_step(memory.fps))  # one frame pair per chunk
        assert int(newest[-1, 0]) == time, "the newest chunk is kept as chosen"
    assert memory.evicted > 0 and sum(sum(c.evicted) for c in memory.chunks) == memory.evicted
    quarters = [row["of_kept"] for row in coverage(memory)[:4]]  # oldest first: none held better than a newer one
    assert quarters == sorted(quarters) and quarters[-1] > 0, quarters
    prefix = len(family_runner.prefix_ids)
    assert memory.layers[0].positions[0][:prefix, 0].tolist() == list(range(prefix))
    assert len(family_runner.answer(memory, QUESTION, max_new_tokens=2).token_ids) >= 1


def test_budget_smaller_than_a_chunk_is_refused_without_damage(tiny_runner):
    memory = tiny_runner.new_memory(budget=10)  # not even the prompt text fits
    with pytest.raises(ValueError, match="raise the budget"):
        tiny_runner.ingest(memory, random_frames(4), FullPolicy())
    assert memory.tokens_per_layer() == [0] * tiny_runner.num_layers


def test_a_chunk_takes_at_most_half_the_budget(tiny_runner):
    """A chunk whose policy keeps more than half the budget (here everything) keeps its most important share in
    every layer instead of being refused or emptying the memory of the past."""
    frames = random_frames(16, seed=21)
    memory = tiny_runner.new_memory(budget=40)
    policy = make_policy("uniform", {"ratio": 1.0}, PROBE)
    for start in (0, 8):
        record = tiny_runner.ingest(memory, frames[start:start + 8], policy)
        assert 0 < record.chosen["capped"] < 1
        assert sum(record.kept) <= 40 * tiny_runner.num_layers // 2 + 1
    assert sum(memory.tokens_per_layer()) <= 40 * tiny_runner.num_layers
    held = memory.layers[0].chunk[0]
    assert bool((held == 0).any()), "the first chunk is still held after the second came in"


def test_generic_memory_serves_questions_while_it_grows(tiny_runner):
    frames = random_frames(12, seed=12)
    policy = emloc(0.05)
    memory = tiny_runner.new_memory()
    for start in (0, 4):
        tiny_runner.ingest(memory, frames[start:start + 4], policy)
    before = question_logits(tiny_runner, memory, QUESTION)
    first = tiny_runner.answer(memory, QUESTION, max_new_tokens=3)
    torch.testing.assert_close(question_logits(tiny_runner, memory, "Another question?")[:0], before[:0])
    torch.testing.assert_close(question_logits(tiny_runner, memory, QUESTION), before, atol=0, rtol=0)
    tiny_runner.ingest(memory, frames[8:], policy)  # more video after a question: memory extended, not rebuilt
    assert len(memory.chunks) == 3
    later = tiny_runner.answer(memory, QUESTION, max_new_tokens=3)
    assert later.first_token_logprobs != first.first_token_logprobs


def test_question_probe_mode_uses_the_question(tiny_runner):
    from streamer.config import Config, override

    config = override(Config(), "memory", policy="emloc")
    override(config, "probe", mode="question", answer_tokens=2, js_positions=2)
    policy = config.make_policy("How many dogs are there?")
    assert policy.probe.prompts == ["How many dogs are there?"]
    with pytest.raises(ValueError, match="needs the question"):
        config.make_policy(None)


def test_js_divergence_properties():
    torch.manual_seed(0)
    p, q = torch.randn(4, 50), torch.randn(4, 50)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p), abs=1e-6)
    per_position = [js_divergence(p[i:i + 1], q[i:i + 1]) for i in range(4)]
    assert js_divergence(p, q, "max") == pytest.approx(max(per_position), abs=1e-6)
    assert js_divergence(p, q) == pytest.approx(sum(per_position) / 4, abs=1e-6)
    disjoint_p = torch.full((1, 4), -1e4); disjoint_p[0, 0] = 0
    disjoint_q = torch.full((1, 4), -1e4); disjoint_q[0, 1] = 0
    assert js_divergence(disjoint_p, disjoint_q) == pytest.approx(math.log(2), abs=1e-6)
    assert js_divergence(p.bfloat16() * 30, q.bfloat16() * 30) <= math.log(2) + 1e-6  # bf16 logits: no NaN
    assert not math.isnan(js_divergence(p.bfloat16() * 30, q.bfloat16() * 30))


@pytest.mark.parametrize("options, message", [
    ({"delta": -0.1}, "delta"), ({"ratios": []}, "ratios"), ({"ratios": [0.1, 1.5]}, "ratio"),
    ({"group_size": 0}, "group_size"), ({"deltaa": 1}, "bad options"), ({"layer_beta": 0.5}, "layer_beta"),
    ({"layer_weights": [1.0, 0.0]}, "layer_weights"),
])
def test_bad_emloc_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_policy("emloc", options)


# --- policies against a fake model: memory/ needs no engine -----------------------------------------

class FakeProbe:
    """Attention ranks chunk tokens by index; hiding tokens in layer l moves the logits by weights[l]
    times the fraction hidden, so which layers may be pruned is known in advance."""

    def __init__(self, model):
        self.model = model
        heads, n = model.kv_heads, model.chunk_len
        self.attention = [torch.arange(n, dtype=torch.float32).expand(heads, n).clone() for _ in model.weights]
        self.reference = torch.zeros(1, 8)

    def rerun(self, from_layer, keeps):
        self.model.forwards += 1
        return [self._rerun(from_layer, keep) for keep in keeps]

    def _rerun(self, from_layer, keep):
        assert all(layer >= from_layer for layer in keep), "a re-run from a layer must not prune below it"
        self.model.reruns.append((from_layer, sorted(keep)))
        shift = sum(self.model.weights[layer] * float(1 - mask.float().mean()) for layer, mask in keep.items())
        return torch.tensor([[shift, 0, 0, 0, 0, 0, 0, 0]])


class FakeModel:
    def __init__(self, weights, kv_heads=2, chunk_len=20):
        self.weights, self.kv_heads, self.chunk_len = weights, kv_heads, chunk_len
        self.num_layers = len(weights)
        self.reruns, self.prompts, self.forwards = [], [], 0

    def probe(self, prompt, config):
        self.prompts.append(prompt)
        return FakeProbe(self)


def fake_context(model, protected=2):
    mask = torch.zeros(model.chunk_len, dtype=torch.bool)
    mask[:protected] = True
    memory = KVMemory.empty(model.num_layers, model.kv_heads, 4, "cpu", torch.float32)
    return ChunkContext(memory, torch.zeros(model.chunk_len, 3, dtype=torch.long), mask, model)


def test_emloc_search_on_a_fake_model():
    # the top group (layers 2-3) barely matters, the bottom group (0-1) matters a lot
    model = FakeModel([8.0, 8.0, 0.01, 0.01])
    policy = EmlocPolicy(delta=0.01, ratios=[0.1, 0.5, 1.0], group_size=2, probe=ProbeConfig(prompts=["a", "b"]))
    selection = policy.select(fake_context(model))
    assert model.prompts == ["a", "b"]
    assert selection.report["ratios"] == [1.0, 0.1], "the top group takes the smallest ratio, the bottom none"
    assert selection.report["js"][0] == selection.report["js"][1] <= 0.01, "the fallback keeps the JS above it"
    # per probe: both candidates of the top group, then both of the bottom group with the top's choice in place;
    # a group's candidates in one forward per probe
    assert model.reruns == [(2, [2, 3])] * 4 + [(0, [0, 1, 2, 3])] * 4
    assert model.forwards == 2 * 2
    assert [[g, r] for g, r, _ in selection.report["evaluations"]] == [[1, 0.1], [1, 0.5], [0, 0.1], [0, 0.5]]
    video = 18
    kept = [k.shape[1] for k in selection.kept]
    assert kept == [20, 20, 2 + math.ceil(0.1 * video), 2 + math.ceil(0.1 * video)]
    top = selection.kept[3][0]
    assert top[:2].tolist() == [0, 1] and top[2:].tolist() == [18, 19], "protected text + the best-scored tokens"


def test_emloc_levels_are_the_js_at_which_a_candidate_first_dropped_each_token():
    """Selection.levels (what a tiered memory compacts by): per layer and token, the lowest JS over the bound of the
    group's evaluated candidates that did not keep it; inf for tokens every candidate kept, and for prompt text."""
    model = FakeModel([8.0, 8.0, 0.01, 0.01])
    policy = EmlocPolicy(delta=0.01, ratios=[0.1, 0.5, 1.0], group_size=2)
    context = fake_context(model)
    selection = policy.select(context)
    assert selection.report["ratios"] == [1.0, 0.1]
    video = 18
    for layer in range(4):
        expected = torch.full((2, 20), float("inf"))
        for group, ratio, js in selection.report["evaluations"]:
            if layer // 2 == group:
                keep = keep_count(selection.scores[layer], context.protected, math.ceil(round(ratio * video, 6)))
                expected = torch.where(keep, expected, expected.clamp(max=js / 0.01))
        torch.testing.assert_close(selection.levels[layer], expected)
    assert bool(torch.isinf(selection.levels[3].gather(1, selection.kept[3])).all()), "the smallest candidate kept these"
    bottom = selection.levels[0][:, 2:]
    assert bool(torch.isfinite(bottom).any()) and bool((bottom > 1).all()), "every candidate of a group that kept all failed"
    assert bool(torch.isinf(selection.levels[0][:, :2]).all()), "prompt text"
    assert EmlocPolicy(delta=0.0, ratios=[0.1, 1.0]).select(fake_context(model)).levels is None


def test_emloc_keeps_everything_when_every_layer_matters():
    model = FakeModel([5.0] * 4)
    selection = EmlocPolicy(delta=1e-4, ratios=[0.1, 1.0], group_size=1).select(fake_context(model))
    assert selection.kept is None and selection.report["ratios"] == [1.0] * 4


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_on_a_fake_model_keeps_protected_text(name):
    model = FakeModel([1.0] * 3, kv_heads=2, chunk_len=20)
    options = {"ratio": 0.25} if name in policies_with("ratio") else {}
    selection = make_policy(name, options).select(fake_context(model))
    if name == "full":
        assert selection.kept is None
        return
    assert len(selection.kept) == 3
    for kept in selection.kept:
        assert kept.shape[0] == 2 and kept[:, :2].tolist() == [[0, 1], [0, 1]]
        assert torch.all(kept[:, 1:] > kept[:, :-1]), "sorted, no repeats"


def test_answer_only_probe_compares_the_answer_positions(tiny_runner, monkeypatch):
    """With answer_only the probe's answer stops at its first stop token, and the compared rows are the
    ones that predict the answer's tokens and that stop token."""
    memory = stream(tiny_runner, random_frames(2, seed=13), 2)
    model = ChunkProbes(tiny_runner, MemoryView(memory.context(), extra=0), 0, memory.next_position)
    ids = tiny_runner.suffix_ids(QUESTION)
    decoder = tiny_runner.decoder(len(ids) + 5)
    logits, tokens = decoder.start(memory.context(), memory.next_position, ids, 5), []
    for _ in range(5):
        tokens.append(int(logits.argmax()))
        logits = decoder.step(tokens[-1]) if len(tokens) < 5 else logits
    plain = model.probe(QUESTION, ProbeConfig(js_positions=6, answer_tokens=5))
    assert plain.reference.shape[0] == 6 and plain.forward.count == len(ids) + 5

    monkeypatch.setattr(tiny_runner, "stop_ids", {tokens[2]})  # the answer ends where tokens[2] first comes
    answer = tokens.index(tokens[2])
    short = model.probe(QUESTION, ProbeConfig(js_positions=6, answer_tokens=5, answer_only=True))
    assert short.forward.count == len(ids) + answer and short.reference.shape[0] == answer + 1
    torch.testing.assert_close(short.reference, plain.reference[:answer + 1], atol=1e-5, rtol=0)


def test_emloc_outlier_candidate_comes_first():
    """With outlier_factor, a group's first candidate keeps the tokens the probe attends to more than
    factor x the chunk's median; the ratios above it follow."""
    model = FakeModel([0.01, 0.01])
    context = fake_context(model)  # 2 protected tokens, 18 video tokens

    class Peaked(FakeProbe):
        def __init__(self, model):
            super().__init__(model)
            for attention in self.attention:
                attention[:] = 1.0
                attention[:, [5, 9, 13]] = 10.0

    model.probe = lambda prompt, config: Peaked(model)
    unsmoothed = ProbeConfig(smoothing=1)
    policy = EmlocPolicy(delta=0.5, ratios=[0.5, 1.0], group_size=2, outlier_factor=3.0, probe=unsmoothed)
    selection = policy.select(context)
    assert selection.report["ratios"] == [pytest.approx(3 / 18)]
    assert [k[0].tolist() for k in selection.kept] == [[0, 1, 5, 9, 13]] * 2
    strict = EmlocPolicy(delta=1e-6, ratios=[0.5, 1.0], group_size=2, outlier_factor=3.0,
                         probe=unsmoothed).select(context)
    assert [round(r, 3) for _, r, _ in strict.report["evaluations"]] == [round(3 / 18, 3), 0.5]
    with pytest.raises(ValueError, match="outlier_factor"):
        EmlocPolicy(outlier_factor=-1.0)


def test_emloc_layer_profile_keeps_more_in_lower_layers():
    """layer_beta > 1: a candidate ratio is the mean of PyramidKV's profile over the model's layers, so one
    group's layers keep different counts, the lowest layer the most."""
    model = FakeModel([0.01] * 4, chunk_len=42)  # 40 video tokens
    policy = EmlocPolicy(delta=0.5, ratios=[0.2, 1.0], group_size=4, layer_beta=4.0)
    selection = policy.select(fake_context(model))
    counts = [k.shape[1] - 2 for k in selection.kept]
    assert counts == [math.ceil(round(r * 40, 6)) for r in pyramid_ratios(0.2, 4.0, 4)]
    assert counts[0] > counts[-1] and selection.report["ratios"] == [0.2]
    flat = EmlocPolicy(delta=0.5, ratios=[0.2, 1.0], group_size=4).select(fake_context(model))
    assert [k.shape[1] - 2 for k in flat.kept] == [8] * 4
    weighted = EmlocPolicy(delta=0.5, ratios=[0.2, 1.0], group_size=4, layer_weights=[3.0, 0.5, 0.25, 0.25])
    assert [k.shape[1] - 2 for k in weighted.select(fake_context(model)).kept] == [24, 4, 2, 2]  # 40 x 0.2 x w / mean(w), mean 1
    with pytest.raises(ValueError, match="4 layers"):
        EmlocPolicy(layer_weights=[1.0, 2.0]).select(fake_context(model))


def test_recent_keeps_only_the_newest_frames(tiny_runner):
    frames = random_frames(12, seed=13)
    policy = make_policy("recent", {"frames": 4})
    memory = tiny_runner.new_memory()
    pair_tokens = None
    for start, count in ((0, 4), (4, 4), (8, 2), (10, 2)):  # short chunks, as when a question arrives mid-chunk
        report = tiny_runner.ingest(memory, frames[start:start + count], policy)
        pair_tokens = pair_tokens or (report.tokens - len(tiny_runner.prefix_ids)) // 2
        prefix = len(tiny_runner.prefix_ids)
        for layer in memory.layers:
            times = layer.positions[:, prefix:, 0]
            newest = memory.video_start + memory.temporal_groups - 2
            assert times.unique().tolist() == [newest, newest + 1], "the last two frame pairs, nothing older"
            assert layer.positions.shape[1] == prefix + 2 * pair_tokens
    assert memory.evicted == 4 * pair_tokens * tiny_runner.num_layers  # 6 pairs ingested, the newest 2 held
    assert len(tiny_runner.answer(memory, QUESTION, max_new_tokens=2).token_ids) >= 1
    with pytest.raises(ValueError, match="frames"):
        make_policy("recent", {"frames": 0})


def test_chunk_stretches_hold_every_chunk_whatever_their_lengths(tiny_runner):
    """The page's timeline: stretches of whole chunks, so a short chunk (after a flush) leaves no stretch empty,
    every chunk counts once, and a fully held stream is held everywhere."""
    memory = tiny_runner.new_memory()
    frames = random_frames(13, seed=3)
    for start, end in [(0, 4), (4, 8), (8, 9), (9, 13)]:  # a 1-frame chunk between 4-frame ones
        tiny_runner.ingest(memory, frames[start:end], FullPolicy(), fps=2.0)
    for count, expected in [(48, [(0, 2), (2, 4), (4, 4.5), (4.5, 6.5)]), (3, [(0, 4), (4, 6.5)])]:
        stretches = chunk_stretches(memory, count)
        assert [(start, end) for _, start, end in stretches] == expected
        assert [row["held"] for row in coverage(memory, stretches)] == [1.0] * len(expected)
