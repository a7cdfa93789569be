import json
import math
import tomllib
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import Stopped, question_logits, stop_at, stream

from memory.baselines import FullPolicy
from streamer.builtin.train import (DEFAULT_CONFIG, NAMED_HEADS, PROBE_HEADS, QUESTION_HEADS, VIDEO_HEADS, ModelConfig,
                                    Packer, Probes, Stage, TrainConfig, batch_loss, build_model, main, make_batch,
                                    token_labels, train)
from streamer.builtin.train_long import LongTrainConfig
from streamer.builtin.videos import (ANSWER_WORDS, BUILTIN_PRESET, COLOURS, DURATIONS, QUESTION_KINDS, OPTIONS,
                                     TRAIN_KINDS, Event, SyntheticVideo, make_video)
from streamer.engine.attention import MEMORY_ATTENTION
from streamer.engine.models import BUILTIN, BUILTIN_CHOICE, TRAINED_MODELS, load_model
from streamer.engine.runner import Runner

TINY = ModelConfig(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, mrope_section=[2, 3, 3],
                   vision_dim=32, vision_heads=2)


@pytest.fixture(scope="module")
def builtin() -> Runner:
    loaded = load_model("builtin", device="cpu", dtype="float32")
    assert loaded.preset == BUILTIN_PRESET  # read from the checkpoint's preset.json
    return Runner(loaded, preset=loaded.preset)


def test_builtin_is_small_and_offline(builtin):
    for directory in TRAINED_MODELS.values():
        assert sum(f.stat().st_size for f in directory.iterdir()) < 4 * 2**20  # float16 weights, run in float32
    assert builtin.model.dtype == torch.float32
    assert builtin.model.config.text_config.vocab_size == len(builtin.tokenizer)


def held_out_correct(runner: Runner) -> Counter:
    """Right answers per family on deterministic videos (held-out seeds), streamed chunk by chunk, full memory."""
    correct = Counter()
    for seed in range(8):
        video = make_video(seed, 96)
        memory = stream(runner, video.frames(), 32)
        for qa in video.questions(QUESTION_KINDS):
            correct[qa.kind] += runner.answer(memory, qa.question, max_new_tokens=4).text == qa.answer
    return correct


def test_builtin_answers_held_out_videos(builtin):
    correct = held_out_correct(builtin)
    # measured: 8 of 8 in every family; over the 40 questions uniform guessing gets about 9, the most
    # frequent answers 17. A floor rather than 40, so that float differences across machines can flip one.
    assert all(correct[family] >= 7 for family in QUESTION_KINDS), correct
    assert correct.total() >= 38, correct


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_builtin_answers_in_bfloat16_through_cuda_graphs():
    loaded = load_model("builtin", device="cuda", dtype="bfloat16")
    runner = Runner(loaded, preset=loaded.preset)
    assert runner.static_decoder is not None
    correct = held_out_correct(runner)
    assert runner.static_decoder.cuda_graphs and runner.static_decoder.buffers.graphs
    assert all(correct[family] >= 7 for family in QUESTION_KINDS), correct
    assert correct.total() >= 38, correct


def test_training_layout_is_what_the_runner_computes(builtin):
    """The packed training forward (several questions after one video) predicts each answer's
    first token exactly as the runner does after streaming that video."""
    video = make_video(3, 48)
    packer = Packer(builtin.tokenizer)
    batch = packer.batch([packer.sample(video, video.questions(QUESTION_KINDS))])
    model = builtin.model
    model.set_attn_implementation({"text_config": "sdpa"})
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                                 pixel_values_videos=batch.pixels, video_grid_thw=batch.grids).last_hidden_state
    finally:
        model.set_attn_implementation({"text_config": MEMORY_ATTENTION})
    first_answer_rows = [i for i in range(batch.ids.shape[1] - 1) if batch.targets[0, i] != -100
                         and batch.targets[0, i - 1] == -100]
    memory = builtin.new_memory()
    builtin.ingest(memory, video.frames(), FullPolicy())
    for row, qa in zip(first_answer_rows, video.questions(QUESTION_KINDS), strict=True):
        expected = question_logits(builtin, memory, qa.question)[-1]
        with torch.no_grad():
            logits = model.lm_head(hidden[0, row])  # hidden is already normed
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_shipped_weights_come_from_the_shipped_configs():
    config = TrainConfig.from_dict(tomllib.loads(DEFAULT_CONFIG.read_text()))
    record = json.loads((TRAINED_MODELS[BUILTIN] / "training.json").read_text())
    # builtin: builtin_long_replay.toml (threads aside) from v2, trained from scratch by builtin.toml (written
    # before `init` and the stages' `questions` existed: their defaults)
    long = LongTrainConfig.from_dict(tomllib.loads((DEFAULT_CONFIG.parent / "builtin_long_replay.toml").read_text()))
    assert replace(LongTrainConfig.from_dict(record["long_stream"]), threads=long.threads) == long
    assert [h["step"] for h in record["history"]][-1] == long.steps and "exported_at_step" not in record
    v2 = record["base"]
    assert asdict(TrainConfig.from_dict(v2["config"])) == asdict(config)
    # builtin-choice: builtin_tune.toml from exactly v2
    tune = TrainConfig.from_dict(tomllib.loads((DEFAULT_CONFIG.parent / "builtin_tune.toml").read_text()))
    tuned = json.loads((TRAINED_MODELS[BUILTIN_CHOICE] / "training.json").read_text())
    assert tuned["config"]["init"] == "streamer/assets/builtin" and tuned["base"] == v2
    assert asdict(TrainConfig.from_dict({**tuned["config"], "init": ""})) == asdict(tune)


@pytest.mark.slow
def test_training_smoke_saves_a_loadable_checkpoint(tmp_path):
    (tmp_path / "tiny.toml").write_text(
        "warmup = 1\nlog_every = 1\n[model]\nhidden = 32\nintermediate = 64\nlayers = 2\nheads = 2\n"
        "kv_heads = 1\nmrope_section = [2, 3, 3]\nvision_dim = 32\n[[stages]]\nmin_frames = 16\n"
        "max_frames = 20\nsteps = 2\nbatch = 2\n")
    assert main(["--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert len(record["history"]) == 2 and all(math.isfinite(h["loss"]) for h in record["history"])
    loaded = load_model(str(tmp_path / "out"), device="cpu")
    assert loaded.preset == BUILTIN_PRESET and loaded.dtype == torch.float32  # stored in float16
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float16}
    runner = Runner(loaded, preset=loaded.preset)
    memory = runner.new_memory()
    runner.ingest(memory, make_video(0, 16).frames(), FullPolicy())
    assert runner.answer(memory, "What colour appeared first?", max_new_tokens=2).first_token_logprobs
    # a fine-tune starts from those weights (with no learning rate it keeps them) and records what it came from
    still = (tmp_path / "tiny.toml").read_text().replace("warmup = 1", "warmup = 1\nlr = 0.0\nfinal_lr = 0.0")
    (tmp_path / "still.toml").write_text(still)
    assert main(["--config", str(tmp_path / "still.toml"), "--init", str(tmp_path / "out"),
                 "--out", str(tmp_path / "tuned")]) == 0
    base, tuned_weights = (load_file(tmp_path / name / "model.safetensors") for name in ("out", "tuned"))
    assert base.keys() == tuned_weights.keys() and all(torch.equal(base[k], tuned_weights[k]) for k in base)
    tuned = json.loads((tmp_path / "tuned" / "training.json").read_text())
    assert tuned["base"] == record and tuned["config"]["init"] == str(tmp_path / "out")
    with pytest.raises(ValueError, match="no model.safetensors"):
        main(["--config", str(tmp_path / "tiny.toml"), "--init", str(tmp_path)])


@pytest.mark.slow
def test_training_overfits_one_batch():
    torch.manual_seed(0)
    tokenizer = load_model("tiny-random", device="cpu").tokenizer
    model = build_model(TINY, tokenizer, seed=0).train()
    batch = make_batch(Packer(tokenizer), seed=0, step=0, stage=Stage(16, 16, 1, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        answer, _, _ = batch_loss(model, batch)
        optimizer.zero_grad()
        answer.backward()
        optimizer.step()
        losses.append(answer.item())
    assert losses[-1] < 0.35 * losses[0], losses


def test_a_text_only_stage_packs_questions_without_a_video():
    packer = Packer(load_model("tiny-random", device="cpu").tokenizer)
    batch = make_batch(packer, seed=0, step=0, stage=Stage(0, 0, 1, 3, ["pick", "pick"]))
    assert batch.grids.shape == (0, 3) and not (batch.ids == packer.video_token).any() and len(batch.labels) == 0
    letters = batch.targets[batch.targets != -100].view(6, 2)  # a letter and <|im_end|> per question
    assert (letters[:, 1] == packer.end).all() and {packer.tokenizer.decode(t) for t in letters[:, 0]} <= set("ABCD")
    asked = batch.mentions[..., -1][batch.mentions[..., -1] != -100]
    assert len(asked) == 6, "the asked word is labelled at each question's end"
    model = build_model(TINY, packer.tokenizer, seed=0)
    answer, aux, per_family = batch_loss(model, batch, Probes(TINY.hidden))
    assert math.isfinite(answer.item()) and aux[PROBE_HEADS.index("asked_answer")] > 0
    assert per_family[TRAIN_KINDS.index("pick")] > 0
    assert make_batch(packer, 0, 0, Stage(0, 0, 1, 3, ["pick", "pick"])).ids.equal(batch.ids)  # by (seed, step)
    # a video stage's `text`: that many text-only samples join its videos in each batch
    mixed = make_batch(packer, seed=0, step=0, stage=Stage(16, 16, 1, 2, text=1))
    assert len(mixed.ids) == 3 and len(mixed.grids) == 2
    assert [(row == packer.video_token).any().item() for row in mixed.ids] == [True, True, False]
    assert (mixed.kind[2][mixed.kind[2] != -1] == TRAIN_KINDS.index("pick")).all()
    answer, _, per_family = batch_loss(model, mixed, Probes(TINY.hidden))
    assert math.isfinite(answer.item()) and per_family[TRAIN_KINDS.index("pick")] > 0
    with pytest.raises(ValueError, match="need no video"):
        Stage(0, 0, 1, 3, ["where"])
    with pytest.raises(ValueError, match="adds text-only samples to a video stage"):
        Stage(0, 0, 1, 3, ["pick"], text=1)
    with pytest.raises(ValueError, match="not families"):
        Stage(16, 32, 1, 3, ["wher"])


def test_pruned_questions_see_the_objects_and_some_of_the_rest():
    packer = Packer(load_model("tiny-random", device="cpu").tokenizer)
    video = make_video(5, 48)
    shown = torch.from_numpy(video.event_tokens().reshape(-1))
    columns = slice(len(packer.prefix), len(packer.prefix) + len(shown))
    for pruned in (0.0, 1.0):
        sample = packer.sample(video, video.questions(QUESTION_KINDS), pruned, np.random.default_rng(0))
        visible, segment = packer.batch([sample]).mask[0, 0], torch.tensor(sample["segment"])
        for k in range(1, len(QUESTION_KINDS) + 1):
            sees = visible[segment == k][:, columns]
            assert (sees == sees[-1]).all(), "every token of a question sees the same video tokens"
            assert sees[-1][shown].all() and (sees[-1].all() if pruned == 0 else sees[-1].float().mean() < 0.5)


def test_mention_labels_name_what_the_questions_look_up():
    video = make_video(5, 96)
    packer = Packer(load_model("tiny-random", device="cpu").tokenizer)
    sample = packer.sample(video, video.questions(QUESTION_KINDS))
    word = packer.words
    named = [(i, label) for i, label in enumerate(sample["mentions"]) if label[:NAMED_HEADS] != (-100,) * NAMED_HEADS]
    events = {(e.colour, e.shape): (k, e) for k, e in enumerate(video.events, start=1)}
    for i, (colour, count, number, cell, duration, companion, letter, right, _) in named:
        assert (letter, right) == (-100, -100) and len(QUESTION_HEADS) == NAMED_HEADS + 3
        if word.get(sample["ids"][i + 1]) == "shape":  # "How many times did a {colour} shape appear?"
            assert (colour, number, cell, duration, companion) == (-100,) * 5
            assert count == sum(e.colour == word[sample["ids"][i]] for e in video.events)
        else:  # "... the {colour} {shape} ...": labelled on the shape
            named_colour, named_shape = word[sample["ids"][i - 1]], word[sample["ids"][i]]
            k, event = events[(named_colour, named_shape)]
            other = video.companion(event)
            assert count == -100 and (number, cell) == (k, event.cell)
            assert colour == list(COLOURS).index(named_colour) and DURATIONS[duration] == event.frames
            assert companion == (0 if other is None else 1 + list(COLOURS).index(other.colour))
    assert len(named) == 4  # where, duration, together: their object; count: its colour


def test_answer_labels_mark_the_options_and_the_asked_answer():
    video = make_video(5, 96)
    packer = Packer(load_model("tiny-random", device="cpu").tokenizer)
    asked = ("choice",) * 6 + ("where", "describe")
    sample = packer.sample(video, video.questions(asked))
    words = lambda i: packer.tokenizer.decode(sample["ids"][i]).strip()
    options = [(i, label[-3:-1]) for i, label in enumerate(sample["mentions"]) if label[-2] != -100]
    ends = [(i, ANSWER_WORDS[label[-1]]) for i, label in enumerate(sample["mentions"]) if label[-1] != -100]
    questions = video.questions(asked)
    assert len(options) == 6 * OPTIONS and len(ends) == 7, "describe asks no family's question"
    for k, qa in enumerate(questions[:6]):
        mine = options[k * OPTIONS:(k + 1) * OPTIONS]
        assert [letter for _, (letter, _) in mine] == list(range(OPTIONS))
        assert [right for _, (_, right) in mine] == [int(chr(65 + n) == qa.answer) for n in range(OPTIONS)]
        assert [words(i) for i, _ in mine] == [option.split()[-1] for option in qa.options]
        end, answer = ends[k]
        assert words(end) == "?" and answer == qa.options[ord(qa.answer) - 65] and qa.asked in qa.question
    assert ends[6][1] == questions[6].answer and words(ends[6][0]) == "?"
    assert len({qa.question.split("\n")[0][:20] for qa in questions[:6]}) > 1, "more than one benchmark's wording"


def test_token_labels_follow_the_events():
    events = (Event("red", "circle", 4, 8, 0, 0), Event("blue", "star", 8, 2, 4, 0),
              Event("red", "square", 20, 4, 8, 1))
    video = SyntheticVideo(seed=7, num_frames=32, background=30, events=events, layout=((0, 0, 11),) * 3)
    labels = token_labels(video).view(16, 9, len(VIDEO_HEADS))
    column = {name: k for k, (name, _, _) in enumerate(VIDEO_HEADS)}
    red, blue = 1 + list(COLOURS).index("red"), 1 + list(COLOURS).index("blue")
    assert labels[2:6, 0, column["colour"]].tolist() == [red] * 4 and labels[1, 0, column["colour"]] == 0
    assert labels[2:6, 0, column["run"]].tolist() == [1, 2, 3, 4]
    assert labels[2:6, 0, column["companion"]].tolist() == [-100, -100, blue, blue]  # blue appears at pair 4
    assert labels[4, 4, column["companion"]] == red and labels[10, 8, column["companion"]] == 0
    assert labels[10:12, 8, column["repeats"]].tolist() == [2, 2]  # the second red event
    assert labels[:, :, column["events"]].amax(dim=1).tolist() == [0, 0] + [1] * 2 + [2] * 6 + [3] * 6
    assert labels[3, :, column["cell"]].tolist() == list(range(9))


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_exactly(tmp_path):
    config = TrainConfig(model=TINY, stages=[Stage(16, 16, 2, 2)], warmup=1, log_every=1, questions=["first"])

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(Stopped):
        train(config, None, log=stop_at("step 1/"), checkpoint=checkpoint)
    resumed, record = train(config, None, log=lambda line: None, checkpoint=checkpoint)
    straight, _ = train(config, None, log=lambda line: None)
    assert [h["step"] for h in record["history"]] == [1, 2]
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another training config"):
        train(TrainConfig(model=TINY, stages=[Stage(16, 16, 3, 2)]), None, checkpoint=checkpoint)
