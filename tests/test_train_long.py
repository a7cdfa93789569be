"""The long-stream fine-tune: it reads through the memory, learns, keeps the vision tower, and resumes exactly."""

import math

import pytest
import torch
from conftest import Stopped, stop_at

from streamer.builtin.streams import make_stream
from streamer.builtin.train import TRAIN_SEEDS
from streamer.builtin.train_long import LongTrainConfig, answer_loss, export, main, train_long
from streamer.config import load_config
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video

QUICK = dict(videos=[1, 1], chunk_frames=128, steps=2, warmup=1, log_every=1, budget=128)


def test_the_answer_loss_reads_the_memory_and_its_gradient_lowers_it():
    runner = Runner(load_model("builtin", device="cpu", dtype="float32"))
    stream = make_stream(0, 1, first_video=TRAIN_SEEDS)
    config = load_config("stream_default")
    with torch.inference_mode():
        memory = ingest_video(runner, stream.frames(), config.make_policy(), 64, runner.new_memory(budget=128))
    questions = stream.questions["first"]
    loss = answer_loss(runner, memory, questions)
    assert math.isfinite(float(loss.detach())) and loss.requires_grad
    # one question's loss starts with its answer's first token, as the runner's own answer would score it
    qa = questions[0]
    reply = runner.answer(memory, qa.question, max_new_tokens=1)
    logprob = torch.log_softmax(reply.first_logits, dim=-1)[runner.encode(qa.answer)[0]]
    if len(runner.encode(qa.answer)) == 1:  # one answer token and <|im_end|>: the loss is their mean
        assert float(answer_loss(runner, memory, [qa]).detach()) > -float(logprob) / 2
    parameters = [p for name, p in runner.model.named_parameters() if not name.startswith("model.visual")]
    loss.backward()
    with torch.no_grad():
        for parameter in parameters:
            if parameter.grad is not None:
                parameter -= 1e-2 * parameter.grad
    assert float(answer_loss(runner, memory, questions).detach()) < float(loss.detach())


def test_training_changes_the_reader_not_the_tower_and_resumes_exactly(tmp_path):
    config = LongTrainConfig(**QUICK)

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(Stopped):
        train_long(config, None, log=stop_at("step 1/"), checkpoint=checkpoint)
    resumed = tmp_path / "resumed"
    record = train_long(config, resumed, log=lambda line: None, checkpoint=checkpoint)
    assert [h["step"] for h in record["history"]] == [1, 2] and all(math.isfinite(h["loss"]) for h in record["history"])
    straight = tmp_path / "straight"
    train_long(config, straight, log=lambda line: None)
    base = load_model("builtin", device="cpu", dtype="float32").model.state_dict()
    weights = {name: load_model(str(path), device="cpu", dtype="float32").model.state_dict()
               for name, path in (("resumed", resumed), ("straight", straight))}
    for name, tensor in weights["resumed"].items():
        torch.testing.assert_close(tensor, weights["straight"][name], rtol=0, atol=0)
        if name.startswith("model.visual"):
            assert torch.equal(tensor, base[name].half().float()), f"{name}: the vision tower is frozen"
    assert any(not torch.equal(t, base[n].half().float()) for n, t in weights["resumed"].items()
               if n.startswith("model.language_model"))
    with pytest.raises(ValueError, match="another training config"):
        train_long(LongTrainConfig(**{**QUICK, "steps": 3}), None, checkpoint=checkpoint)
    with pytest.raises(SystemExit, match="2"):  # weights there already, no --force
        main(["--steps", "1", "--out", str(resumed)])
    exported = tmp_path / "exported"  # a look at a run's checkpoint: here the finished run's last step
    assert "step 2 of 2" in export(config, checkpoint, exported)
    for name, tensor in load_model(str(exported), device="cpu", dtype="float32").model.state_dict().items():
        assert torch.equal(tensor, weights["resumed"][name]), name
    with pytest.raises(SystemExit, match="2"):  # nothing to export from
        main(["--export", "--out", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "none.ckpt")])


def test_replay_adds_the_init_models_own_loss_and_older_checkpoints_resume(tmp_path):
    """replay > 0 adds the init model's own training loss (gradients through the video tokens) to a step;
    a checkpoint written before the replay settings existed resumes as a run without replay."""
    one = {**QUICK, "steps": 1}
    plain, replayed = tmp_path / "plain", tmp_path / "replayed"
    train_long(LongTrainConfig(**one), plain, log=lambda line: None)
    train_long(LongTrainConfig(**one, replay=1.0, replay_videos=1), replayed, log=lambda line: None)
    weights = [load_model(str(path), device="cpu", dtype="float32").model.state_dict() for path in (plain, replayed)]
    assert any(not torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items()
               if name.startswith("model.language_model"))
    checkpoint = tmp_path / "old.ckpt"
    with pytest.raises(Stopped):
        train_long(LongTrainConfig(**QUICK), None, log=stop_at("step 2/"), checkpoint=checkpoint)
    state = torch.load(checkpoint)  # written at step 1 (the log line comes first)
    assert state["step"] == 1
    for key in ("replay", "replay_videos"):
        del state["config"][key]
    torch.save(state, checkpoint)
    record = train_long(LongTrainConfig(**QUICK), None, log=lambda line: None, checkpoint=checkpoint)
    assert [h["step"] for h in record["history"]] == [1, 2]
    with pytest.raises(ValueError, match="replay"):
        LongTrainConfig.from_dict({"replay": -1.0})
