"""`streamer eval long-stream`: its streams, its memories, the tables and the section it writes."""

import json

import pytest

from streamer.builtin.train import TRAIN_SEEDS
from streamer.cli import main
from streamer.evaluation import long_stream, synthetic
from streamer.builtin.streams import DRAWS, PARTS, SEGMENT, make_stream, names
from streamer.evaluation.long_stream import MID, SECTION, LongStreamConfig, memory_config


@pytest.mark.parametrize("count", [3, 8])
def test_a_question_names_an_object_shown_in_one_video_of_its_part(count):
    stream = make_stream(seed=2, count=count)
    assert len(stream.videos) == count and stream.parts == dict(first=0, middle=count // 2, last=count - 1)
    assert all(video.seed < TRAIN_SEEDS and video.num_frames == SEGMENT for video in stream.videos)
    shown = [name for video in stream.videos for name in names(video)]
    for part, questions in stream.questions.items():
        assert questions, f"the {part} part has no question"
        own = names(stream.videos[stream.parts[part]])
        for qa in questions:
            if qa.kind == "first":
                assert part == "first" and qa.answer == stream.videos[0].events[0].colour
                continue
            named = [name for name in own if f"the {name}" in qa.question]
            assert len(named) == 1 and shown.count(named[0]) == 1, qa.question
    again = make_stream(seed=2, count=count)
    assert [v.seed for v in again.videos] == [v.seed for v in stream.videos] and again.questions == stream.questions
    assert {v.seed for v in make_stream(seed=3, count=count).videos}.isdisjoint(v.seed for v in stream.videos)
    training = make_stream(seed=2, count=count, first_video=TRAIN_SEEDS)
    assert all(video.seed >= TRAIN_SEEDS for video in training.videos)


def test_memories_are_given_by_config_or_policy_with_options():
    label, config = memory_config("recent:recent:frames=112", 512)
    assert label == "recent" and config.make_policy().frames == 112
    assert config.memory.budget == 512
    label, config = memory_config("default:stream_default:budget=256,recall=128,delta=0.2", 512)
    assert config.memory.policy == "emloc" and config.memory.limits()["budget"] == 256
    assert config.memory.recall == 128 and config.make_policy().delta == 0.2
    assert memory_config("full:full", 512)[1].memory.limits()["budget"] is None
    assert memory_config("a:stream_default", 512, "builtin-choice")[1].model.name == "builtin-choice"
    assert memory_config("a:stream_default:model=tuned,recall=0", 512)[1].model.name == "tuned", "its own model"
    with pytest.raises(ValueError, match="LABEL:CONFIG_OR_POLICY"):
        memory_config("recent", 512)
    with pytest.raises(ValueError, match="unknown"):
        memory_config("r:recent:frame=3", 512)
    with pytest.raises(ValueError, match="training videos"):
        LongStreamConfig(first_seed=TRAIN_SEEDS // DRAWS).validate()
    with pytest.raises(ValueError, match="at least 3"):
        LongStreamConfig(lengths=[2]).validate()


def test_a_short_run_end_to_end(tmp_path, capsys):
    page = tmp_path / "SYNTHETIC.md"
    page.write_text("# Synthetic\n\ntables\n")
    out = tmp_path / "long.json"
    args = ["eval", "long-stream", "--lengths", "3", "--streams", "1", "--chunk-frames", "128", "--bootstrap", "50",
"--memories", "default:stream_default;recent:recent:frames=32;recall:stream_default:budget=64,recall=32;"
            "other:stream_default:model=builtin-choice",
            "--write", str(page), "--json", str(out)]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    table = summary["lengths"]["3"]
    assert table["first"] == "default"
    assert list(table["memories"]) == ["default", "recent", "recall", "other", "full", "alone"]
    questions = {p: table["memories"]["default"]["parts"][p]["questions"] for p in PARTS}
    for label, row in table["memories"].items():
        for part in PARTS:
            entry = row["parts"][part]
            assert entry["questions"] == questions[part] and 0 <= entry["accuracy"] <= 1
            assert entry["interval"][0] <= entry["accuracy"] <= entry["interval"][1]
            assert ("answer_js" in entry) == (label != "full") and ("vs_first" in entry) == (label != "default")
        assert (MID in row["parts"]) == (label in ("default", "recent", "recall", "other"))
        assert (row["host_tokens"] > 0) == (label == "recall"), "only a recalling memory keeps evicted tokens"
        if label != "alone":  # 9 chunks of 128 frames: every quarter of the stream has one
            assert len(row["chunk_seconds"]) == 4 and min(row["chunk_seconds"]) > 0
            assert set(row["first_token_s"]) == ({MID, PARTS[-1]} if label != "full" else {PARTS[-1]})
            assert min(row["first_token_s"].values()) > 0
    memory = {label: row["memory_tokens"] for label, row in table["memories"].items()}
    assert memory["recent"] < memory["default"] < memory["full"] and memory["alone"] is None
    # a 3-video stream through a 512-token budget: the full context holds its 3 x 192 pairs x 9 tokens
    assert memory["full"] > 3 * SEGMENT // 2 * 9 and memory["default"] <= 512 and memory["recall"] <= 64
    text = page.read_text()
    assert text.startswith("# Synthetic\n\ntables\n") and text.count(SECTION) == 1 and "| alone |" in text
    assert "seconds per chunk" in text
    # written again: the section is replaced, not repeated; and `eval synthetic` keeps it
    long_stream.write_section(page, summary, LongStreamConfig(lengths=[3]), "again")
    assert page.read_text().count(SECTION) == 1 and "`again`" in page.read_text()
    synthetic.write_markdown(page, dict(results=[]), synthetic.EvalConfig(), "streamer eval synthetic")
    assert page.read_text().count(SECTION) == 1 and "`again`" in page.read_text()
    assert "| default |" in capsys.readouterr().out


def test_worker_processes_give_one_process_results():
    """Streams measured in two processes (each stream whole in one) give what one process gives."""
    config = dict(lengths=[3], streams=2, chunk_frames=128, memories=["recent:recent:frames=32"], mid_stream=False,
                  alone=False, bootstrap=20)
    one, two = (long_stream.evaluate(LongStreamConfig(**config, workers=w), log=lambda line: None) for w in (1, 2))
    for label in ("recent", "full"):
        mine, theirs = (s["lengths"][3]["memories"][label] for s in (one, two))
        assert mine["parts"] == theirs["parts"] and mine["memory_tokens"] == theirs["memory_tokens"]
