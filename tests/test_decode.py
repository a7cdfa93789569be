"""The static-buffer decoder (the CUDA-graph path) answers exactly as the variable-length one."""

import pytest
import torch
from conftest import random_frames, stream
from reference import RaggedSubsetPolicy, one_shot_greedy

from memory.emloc import EmlocPolicy
from streamer.engine import decode
from streamer.engine.decode import BUCKETS, EagerDecoder, StaticDecoder, greedy_tokens

QUESTION = "What happens in the video?"


@torch.inference_mode()
def step_logits(decoder, runner, memory, question, tokens, max_new_tokens=None):
    """Logits after the question and after each of `tokens` (teacher-forced): [len(tokens) + 1, vocab]."""
    ids = runner.encode(question)
    rows = [decoder.start(memory.context(), memory.next_position, ids, max_new_tokens or len(tokens) + 1).clone()]
    rows += [decoder.step(token).clone() for token in tokens]
    return torch.stack(rows)


def assert_same_steps(runner, memory, static, question=QUESTION, steps=5, max_new_tokens=None):
    eager = step_logits(EagerDecoder(runner), runner, memory, question, [])
    tokens = [int(eager[0].argmax())]
    for _ in range(steps - 1):  # the eager path's own greedy tokens, then both decoders follow them
        tokens.append(int(step_logits(EagerDecoder(runner), runner, memory, question, tokens)[-1].argmax()))
    expected = step_logits(EagerDecoder(runner), runner, memory, question, tokens)
    got = step_logits(static, runner, memory, question, tokens, max_new_tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.fixture
def static_runner(tiny_runner):
    """The tiny runner answering through a StaticDecoder (eager forwards on CPU), restored afterwards."""
    saved = tiny_runner.static_decoder
    tiny_runner.static_decoder = StaticDecoder(tiny_runner)
    yield tiny_runner
    tiny_runner.static_decoder = saved


def test_static_answer_equals_one_shot_greedy(static_runner):
    frames = random_frames(8, seed=1)
    memory = stream(static_runner, frames, 2)
    answer = static_runner.answer(memory, QUESTION, max_new_tokens=6, stop_at_end=False)
    assert answer.token_ids == one_shot_greedy(static_runner, frames, QUESTION, steps=6)
    assert static_runner.static_decoder.buffers is not None, "the answer should have gone through the buffers"


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-qwen3-vl"])
def test_static_steps_equal_eager_on_ragged_memory(request, model):
    """Layers of different lengths: each layer's mask must show exactly its own memory slots (Qwen3-VL: its
    head_dim, q/k norms and interleaved rotary through the buffers too)."""
    runner = request.getfixturevalue("tiny_runner" if model == "tiny-random" else "qwen3_runner")
    memory = stream(runner, random_frames(8, seed=3), 2, RaggedSubsetPolicy(seed=0))
    assert len(set(memory.tokens_per_layer())) > 1
    assert_same_steps(runner, memory, StaticDecoder(runner))


def test_buffers_grow_and_stay_exact_for_smaller_memories(tiny_runner):
    decoder = StaticDecoder(tiny_runner)
    small = stream(tiny_runner, random_frames(4, seed=4), 2)
    large = stream(tiny_runner, random_frames(80, seed=5), 40)
    assert_same_steps(tiny_runner, small, decoder)
    first = decoder.buffers
    assert max(large.tokens_per_layer()) > first.context_slots, "the test needs a memory that outgrows the buffers"
    assert_same_steps(tiny_runner, large, decoder)
    grown = decoder.buffers
    assert grown is not first and grown.context_slots >= max(large.tokens_per_layer())
    # back to the small memory: the large one's keys still sit in the slots past it, masked out
    assert_same_steps(tiny_runner, small, decoder)
    assert decoder.buffers is grown
    # a longer answer than reserved grows the answer slots
    assert_same_steps(tiny_runner, small, decoder, max_new_tokens=grown.capacity)
    assert decoder.buffers.capacity - decoder.buffers.context_slots >= grown.capacity


def test_question_lengths_across_buckets(tiny_runner):
    memory = stream(tiny_runner, random_frames(6, seed=6), 6)
    decoder = StaticDecoder(tiny_runner)
    for words in (1, 20, 70):  # pads of different lengths after the question
        assert_same_steps(tiny_runner, memory, decoder, question=" ".join(["what"] * words), steps=2)
    assert len(decoder.buffers.ids) >= 3


def test_question_past_the_largest_bucket_takes_the_eager_path(static_runner):
    memory = stream(static_runner, random_frames(4, seed=7), 4)
    question = " ".join(["colour"] * (BUCKETS[-1] + 10))
    assert not StaticDecoder.fits(len(static_runner.encode(question)))
    with pytest.raises(ValueError, match="largest bucket"):
        static_runner.static_decoder.start(memory.context(), memory.next_position, static_runner.encode(question), 4)
    got = static_runner.answer(memory, question, max_new_tokens=4, stop_at_end=False)
    static_runner.static_decoder = None
    assert got.token_ids == static_runner.answer(memory, question, max_new_tokens=4, stop_at_end=False).token_ids


def test_static_decoder_refuses_more_steps_than_reserved(tiny_runner):
    memory = stream(tiny_runner, random_frames(2, seed=8), 2)
    decoder = StaticDecoder(tiny_runner)
    decoder.start(memory.context(), memory.next_position, tiny_runner.encode(QUESTION), max_new_tokens=2)
    decoder.step(1)
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        decoder.step(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_equal_eager_forwards():
    from conftest import TEST_PRESET

    from streamer.engine.models import load_model
    from streamer.engine.runner import Runner

    runner = Runner(load_model("tiny-random", device="cuda", dtype="float32"), preset=TEST_PRESET)
    memory = stream(runner, random_frames(8, seed=3), 2, RaggedSubsetPolicy(seed=0))
    decoder = StaticDecoder(runner)
    assert decoder.cuda_graphs
    for _ in range(2):  # the second round replays the graphs recorded in the first
        assert_same_steps(runner, memory, decoder, steps=4)
        assert_same_probes(runner, memory, decoder)
    assert decoder.cuda_graphs and decoder.buffers.graphs, "graphs should have been recorded, not skipped"


def test_probe_answers_through_the_static_decoder_choose_the_same_memory(tiny_runner):
    frames = random_frames(8, seed=9)
    policy = EmlocPolicy(delta=0.02, ratios=[0.1, 0.5, 1.0], group_size=2)
    eager = stream(tiny_runner, frames, 4, policy)
    saved, tiny_runner.static_decoder = tiny_runner.static_decoder, StaticDecoder(tiny_runner)
    try:
        static = stream(tiny_runner, frames, 4, policy)
        assert tiny_runner.static_decoder.buffers is not None, "the probe should have used the static decoder"
    finally:
        tiny_runner.static_decoder = saved
    assert [c.ratios for c in static.chunks] == [c.ratios for c in eager.chunks] == [[0.5, 0.1, 0.1]] * 2
    for a, b in zip(static.chunks, eager.chunks):  # every candidate's re-run, accepted (0.1) or not (0.1 in layers 0-1)
        assert [e[:2] for e in a.chosen["evaluations"]] == [e[:2] for e in b.chosen["evaluations"]]
        assert [e[2] for e in a.chosen["evaluations"]] == pytest.approx([e[2] for e in b.chosen["evaluations"]], abs=1e-5)
    for a, b in zip(static.layers, eager.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)


@torch.inference_mode()
def assert_same_probes(runner, memory, static):
    """Two probes of different lengths, then re-runs alternating between them with keys hidden per KV head."""
    context, lengths = memory.context(), memory.tokens_per_layer()
    prompts = [runner.encode(text) for text in ("Describe the video.", "Which colour is the last square, and why?")]
    runs = {name: [decoder.probe(context, memory.next_position, ids, rows=4) for ids in prompts]
            for name, decoder in (("eager", EagerDecoder(runner)), ("static", static))}
    for eager, static_run in zip(runs["eager"], runs["static"]):
        torch.testing.assert_close(static_run.reference, eager.reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(static_run.layer_inputs[:, :, :eager.count], eager.layer_inputs, atol=1e-5, rtol=0)
        for layer, length in enumerate(lengths):
            assert static_run.attention[layer].shape == (runner.kv_heads, length)
            torch.testing.assert_close(static_run.attention[layer], eager.attention[layer], atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(0)

    def hidden_keys(from_layer):
        return {layer: (torch.rand(runner.kv_heads, length, generator=generator) > 0.5).to(runner.device)
                for layer, length in enumerate(lengths) if layer >= from_layer}

    for index, from_layer in ((0, 3), (1, 3), (0, 0), (1, 5), (0, 3)):
        visible = hidden_keys(from_layer)
        [expected] = runs["eager"][index].rerun(from_layer, [visible])
        [static_logits] = runs["static"][index].rerun(from_layer, [visible])
        torch.testing.assert_close(static_logits, expected, atol=1e-5, rtol=0)
        assert (expected - runs["eager"][index].reference).abs().max() > 1e-4, "hiding keys should change the logits"
        # several candidates re-run together (one forward, eager) give each its own logits
        others = [hidden_keys(from_layer), {}]  # {}: nothing hidden, the reference itself
        together = runs["eager"][index].rerun(from_layer, [others[0], visible, others[1]])
        torch.testing.assert_close(together[1], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(together[0], runs["static"][index].rerun(from_layer, others[:1])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[2], runs["eager"][index].reference, atol=1e-5, rtol=0)


def test_static_probes_and_reruns_equal_eager_on_ragged_context(tiny_runner):
    memory = stream(tiny_runner, random_frames(8, seed=3), 2, RaggedSubsetPolicy(seed=0))
    assert_same_probes(tiny_runner, memory, StaticDecoder(tiny_runner))


class CountingDecoder:
    """A decoder that counts its forwards."""

    def __init__(self, decoder):
        self.decoder, self.forwards = decoder, 0

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def extend(self, ids, rows=1):
        self.forwards += 1
        return self.decoder.extend(ids, rows)


@pytest.mark.parametrize("kind", ["eager", "static"])
@torch.inference_mode()
def test_drafted_tokens_are_the_step_by_step_greedy_ones(tiny_runner, kind):
    memory = stream(tiny_runner, random_frames(8, seed=1), 2)  # an answer of many different tokens
    ids, count = tiny_runner.encode(QUESTION), 12

    def greedy(lookup, stops=frozenset()):
        decoder = CountingDecoder(EagerDecoder(tiny_runner) if kind == "eager" else StaticDecoder(tiny_runner))
        tokens, drafted = greedy_tokens(decoder, memory.context(), memory.next_position, ids, count, set(stops),
                                        lookup)
        return tokens, drafted, decoder.forwards

    expected = []
    for _ in range(count):  # one step at a time, teacher-forced
        expected.append(int(step_logits(EagerDecoder(tiny_runner), tiny_runner, memory, QUESTION, expected)[-1]
                            .argmax()))
    assert len(set(expected)) >= 4
    assert greedy([])[0] == expected
    # the answer itself as the draft (as the previous chunk's probe would give it): one forward for all of it
    assert greedy(ids + expected) == (expected, count, 1)
    # a draft that goes wrong after 5 tokens keeps those, then goes on step by step or from new drafts
    wrong = [(token + 1) % tiny_runner.model.config.text_config.vocab_size for token in expected[5:]]
    tokens, drafted, forwards = greedy(ids + expected[:5] + wrong)
    assert tokens == expected and drafted >= 5 and forwards <= count - 5
    # a stop token ends the answer before it, drafted or not
    stop_at = next(i for i, token in enumerate(expected) if i > 0 and token not in expected[:i])
    for lookup in ([], ids + expected):
        assert greedy(lookup, {expected[stop_at]})[0] == expected[:stop_at]


def test_drafted_probes_choose_the_same_memory(tiny_runner, monkeypatch):
    """A stream whose probes draft their answers ends with the memory of one whose probes step token by token."""
    frames = random_frames(16, seed=11)
    policy = EmlocPolicy(delta=0.02, ratios=[0.1, 0.5, 1.0], group_size=2)
    memories = []
    for drafts in (True, False):
        if not drafts:
            monkeypatch.setattr(decode, "propose", lambda *args: [])
        memories.append(stream(tiny_runner, frames, 4, policy))
    drafted, plain = memories
    assert sum(c.chosen["probe_tokens"]["drafted"] for c in drafted.chunks) > 0
    assert all(c.chosen["probe_tokens"]["drafted"] == 0 for c in plain.chunks)
    for a, b in zip(drafted.chunks, plain.chunks):
        assert a.ratios == b.ratios and a.kept == b.kept
        assert [e[:2] for e in a.chosen["evaluations"]] == [e[:2] for e in b.chosen["evaluations"]]
        assert [e[2] for e in a.chosen["evaluations"]] == pytest.approx([e[2] for e in b.chosen["evaluations"]],
                                                                         abs=1e-5)
    for a, b in zip(drafted.layers, plain.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)


def test_a_probe_answer_that_still_holds_costs_one_forward(tiny_runner, monkeypatch):
    """Given the greedy answer as its draft, the probe's recorded forward checks it and is the whole probe."""
    frames = random_frames(8, seed=12)
    policy = EmlocPolicy(delta=0.02, ratios=[0.1, 0.5, 1.0], group_size=2)
    memory = stream(tiny_runner, frames[:4], 4, policy)
    first = memory.fork()
    tiny_runner.ingest(first, frames[4:], policy)
    forwards = []
    for name in ("probe", "extend"):
        monkeypatch.setattr(EagerDecoder, name, lambda self, *args, name=name, method=getattr(EagerDecoder, name), **kw:
                            forwards.append(name) or method(self, *args, **kw))
    again = memory.fork()
    again.probe_drafts = first.probe_drafts  # as if the previous chunk's answer were this one's
    tiny_runner.ingest(again, frames[4:], policy)
    assert forwards == ["probe"]
    assert again.chunks[-1].chosen["probe_tokens"] == dict(answer=15, drafted=15)
    assert again.chunks[-1].chosen["evaluations"] == first.chunks[-1].chosen["evaluations"]
    for a, b in zip(again.layers, first.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
