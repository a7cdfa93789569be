"""`streamer eval videomme` on a tiny synthetic benchmark, and its parts: the scoring rule of a run, resume,
sharding and merging, the prefetching reader, frames stored at model resolution (the rules themselves:
test_answers.py)."""

import json
import logging
import sys
import threading
import time

import numpy as np
import pytest
import torch

from streamer.cli import main
from streamer.config import load_config, override
from streamer.evaluation.answers import SCORING
from streamer.evaluation.prefetch import prefetch
from streamer.evaluation.results import merge_results, rank_path, rank_paths, read_results, shard, summarize
from streamer.evaluation.harness import Distributed
from streamer.evaluation.videomme import Question, build_prompt, load_questions
from streamer.engine.runner import Answer, Runner, load_runner
from video_io.errors import VideoError
from video_io.preprocess import VisionPreset, preprocess_frames, resize_frames
from video_io.sampling import Sampling, linspace_indices
from video_io.synthetic import write_video

# 8 frames of 112 x 112 pixels per video: 4 x 4 tokens per frame pair; two chunks of 4 frames.
SMALL = ["--model", "tiny-random", "--device", "cpu", "--frames", "8", "--chunk-frames", "4",
         "--min-pixels", "12544", "--max-pixels", "12544"]
LINE_FIELDS = {"question_id", "video", "duration", "domain", "sub_category", "task_type", "prediction", "reply",
               "answer", "correct", "memory_tokens", "full_tokens", "timings", "error", "config_id", "scoring"}
VIDEOS = {"vid1": "short", "vid2": "medium", "vid3": "long"}
TASKS = ["Counting Problem", "Object Recognition", "Action Reasoning"]


def records(videos=VIDEOS):
    return [dict(videoID=video, question_id=f"{video}-{n}", duration=duration, domain="Knowledge",
                 sub_category="Astronomy", task_type=TASKS[n], question=f"Which colour is shown {n}?",
                 options=["A. red", "B. green", "C. blue", "D. grey"], answer="ABCD"[(n + i) % 4], url="ignored")
            for i, (video, duration) in enumerate(videos.items()) for n in range(3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("videomme")
    (root / "videos").mkdir()
    for i, video in enumerate(VIDEOS):
        suffix = ".mkv" if i == 2 else ".mp4"
        write_video(root / "videos" / f"{video}{suffix}", 24, size=(112, 112))
    write_jsonl(root / "questions.jsonl", records())
    return root


def streamer(*argv):
    return main(["-q", *argv])


def evaluate(capsys, questions, videos, out, *switches):
    code = streamer("eval", "videomme", "--questions", str(questions), "--videos", str(videos), "--out", str(out),
                    "--json", *SMALL, *switches)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), read_results(out)


@pytest.fixture
def count_calls(monkeypatch):
    """Counts Runner.new_memory and Runner.answer calls (memories built, questions answered)."""
    calls = {"new_memory": 0, "answer": 0}
    for name in calls:
        original = getattr(Runner, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Runner, name, counted)
    return calls


def without(rows, field):
    return [{k: v for k, v in row.items() if k != field} for row in rows]


def without_timings(summary):
    return {k: v for k, v in summary.items() if k != "mean_seconds_per_video"}


def check_summary(summary, lines):
    correct = sum(line["correct"] for line in lines)
    assert summary["questions"] == len(lines) and summary["correct"] == correct
    assert summary["accuracy"] == pytest.approx(100 * correct / len(lines))
    for key, field in (("by_duration", "duration"), ("by_task_type", "task_type")):
        groups = summary[key]
        assert sum(g["questions"] for g in groups.values()) == len(lines)
        assert sum(g["correct"] for g in groups.values()) == correct
        for name, group in groups.items():
            members = [line for line in lines if line[field] == name]
            assert group["questions"] == len(members) and group["correct"] == sum(m["correct"] for m in members)
    answered = [line for line in lines if line["error"] is None]
    assert summary["errors"] == len(lines) - len(answered)
    if answered:
        assert summary["mean_memory_tokens"] == pytest.approx(np.mean([a["memory_tokens"] for a in answered]))
        assert summary["mean_retention"] == pytest.approx(
            np.mean([a["memory_tokens"] / a["full_tokens"] for a in answered]))


@pytest.mark.parametrize("probe, memories", [("generic", 3), ("question", 9)])
def test_end_to_end_parquet_and_jsonl(capsys, bench, tmp_path, count_calls, probe, memories):
    parquet = write_parquet(tmp_path / "questions.parquet", records())
    summary, lines = evaluate(capsys, parquet, bench / "videos", tmp_path / "a.jsonl", "--probe", probe)
    assert count_calls == {"new_memory": memories, "answer": 9}  # one memory per video, or per question
    assert summary["probe"] == probe and summary["policy"] == "emloc" and summary["videos"] == 3
    assert summary["scoring"] == "lmms-eval"  # the default
    assert [line["question_id"] for line in lines] == [r["question_id"] for r in records()]
    for line in lines:
        assert LINE_FIELDS <= set(line) and line["error"] is None
        assert line["correct"] == (line["prediction"] == line["answer"])
        assert line["scoring"] == "lmms-eval" and line["prediction"] == SCORING["lmms-eval"](line["reply"], list("ABCD"))
        assert 0 < line["memory_tokens"] <= line["full_tokens"] and line["frames"] == 8
        assert {"read_frames", "ingest", "question_prefill", "decode", "total"} <= set(line["timings"])
    if probe == "generic":  # the three questions of a video share its memory
        assert len({(line["video"], line["memory_tokens"]) for line in lines}) == 3
    check_summary(summary, lines)
    assert set(summary["by_duration"]) == {"short", "medium", "long"} and list(summary["by_duration"])[0] == "short"

    jsonl_summary, jsonl_lines = evaluate(capsys, bench / "questions.jsonl", bench / "videos", tmp_path / "b.jsonl",
                                          "--probe", probe)
    assert without(jsonl_lines, "timings") == without(lines, "timings")
    assert without_timings(jsonl_summary) == {**without_timings(summary), "results": str(tmp_path / "b.jsonl")}


@pytest.fixture
def known_replies(monkeypatch):
    """The model replies these nine texts, in order; the list holds the replies given so far."""
    replies, given = iter(["B", "The answer is B.", "A dog runs", "(D) grey", "Answer: a", "None of these",
                           "c) blue", "I think it's D", "A"]), []

    def answer(self, memory, question, max_new_tokens=64, **kwargs):
        assert question.endswith("\n\nAnswer with the option's letter from the given choices directly.")
        given.append(next(replies))
        return Answer(text=given[-1], token_ids=[], first_token_logprobs=[],
                      timings=dict(question_prefill=0.01, decode=0.02))

    monkeypatch.setattr(Runner, "answer", answer)
    return given


def test_accuracy_and_table_with_known_replies(capsys, bench, tmp_path, known_replies):
    summary, lines = evaluate(capsys, bench / "questions.jsonl", bench / "videos", tmp_path / "out.jsonl",
                              "--memory", "full", "--scoring", "strict")
    # answers: vid1 A B C, vid2 B C D, vid3 C D A
    assert [line["prediction"] for line in lines] == ["B", "B", None, "D", "A", None, "C", "D", "A"]
    assert [line["correct"] for line in lines] == [False, True, False, False, False, False, True, True, True]
    assert summary["correct"] == 4 and summary["accuracy"] == pytest.approx(400 / 9)
    assert summary["by_duration"]["long"] == dict(questions=3, correct=3, accuracy=100.0)
    assert summary["by_task_type"]["Counting Problem"]["correct"] == 1  # vid3-0 only
    check_summary(summary, lines)

    assert streamer("eval", "videomme", "--questions", str(bench / "questions.jsonl"), "--videos",
                    str(bench / "videos"), "--out", str(tmp_path / "out.jsonl"), *SMALL, "--memory", "full",
                    "--scoring", "strict") == 0
    table = capsys.readouterr().out  # all done already: just the table
    assert "overall" in table and "44.4%" in table and "duration long" in table and "100.0%" in table
    assert "probe generic, scoring strict\n" in table


def test_the_scoring_rule_is_recorded_and_a_resumed_run_scores_stored_replies_again(capsys, bench, tmp_path,
                                                                                    known_replies):
    questions, videos, out = bench / "questions.jsonl", bench / "videos", tmp_path / "out.jsonl"
    # answers: vid1 A B C, vid2 B C D, vid3 C D A
    predictions = {
        "strict": ["B", "B", None, "D", "A", None, "C", "D", "A"],
        "lmms-eval": ["B", "B", None, "D", "A", None, "C", None, "A"],  # "I think it's D" is no declaration
        "lmms-eval-legacy": ["B", "B", "A", "D", "A", None, None, "D", "A"],  # "A dog", not "c) blue"
    }
    for scoring, correct in (("strict", 4), ("lmms-eval", 3), ("lmms-eval-legacy", 3), ("strict", 4)):
        summary, lines = evaluate(capsys, questions, videos, out, "--memory", "full", "--scoring", scoring)
        assert len(known_replies) == 9  # asked once, in the first run; later runs read the stored replies
        assert [line["reply"] for line in lines] == known_replies
        assert [line["prediction"] for line in lines] == predictions[scoring]
        assert all(line["scoring"] == scoring and line["correct"] == (line["prediction"] == line["answer"])
                   for line in lines)
        assert summary["scoring"] == scoring and summary["correct"] == correct
        check_summary(summary, lines)

    for line in lines:  # lines written before they named their rule were scored by the strict one
        del line["scoring"]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, lines = evaluate(capsys, questions, videos, out, "--memory", "full")
    assert summary["scoring"] == "lmms-eval" and summary["correct"] == 3 and len(known_replies) == 9
    assert [line["prediction"] for line in lines] == predictions["lmms-eval"]


def test_resume_and_merge_of_rank_files(capsys, bench, tmp_path, count_calls):
    questions, videos = bench / "questions.jsonl", bench / "videos"
    whole, _ = evaluate(capsys, questions, videos, tmp_path / "whole.jsonl")
    out = tmp_path / "out.jsonl"

    _, first = evaluate(capsys, questions, videos, out, "--limit", "4")
    assert [line["question_id"] for line in first] == ["vid1-0", "vid1-1", "vid1-2", "vid2-0"]
    with out.open("a") as f:
        f.write('{"question_id": "vid2-1", "vid')  # a line cut short by a kill
    count_calls.update(new_memory=0, answer=0)
    resumed, lines = evaluate(capsys, questions, videos, out)
    assert count_calls == {"new_memory": 2, "answer": 5}  # vid2 (rebuilt) and vid3; done questions not recomputed
    assert [line["question_id"] for line in lines] == [r["question_id"] for r in records()]
    assert without_timings(resumed) == {**without_timings(whole), "results": str(out)}

    # rank files of an interrupted multi-process run are read as done and merged into OUT
    for rank in range(2):
        mine = set(shard(list(VIDEOS), rank, 2))
        rank_path(out, rank).write_text("".join(json.dumps(line) + "\n" for line in lines if line["video"] in mine))
    out.unlink()
    count_calls.update(new_memory=0, answer=0)
    merged, merged_lines = evaluate(capsys, questions, videos, out)
    assert count_calls == {"new_memory": 0, "answer": 0}
    assert merged_lines == lines and not rank_paths(out)
    assert without_timings(merged) == without_timings(resumed)


def test_results_of_another_configuration_are_refused(capsys, bench, tmp_path):
    out = tmp_path / "out.jsonl"
    evaluate(capsys, bench / "questions.jsonl", bench / "videos", out, "--limit", "1", "--memory", "full")
    code = streamer("eval", "videomme", "--questions", str(bench / "questions.jsonl"), "--videos",
                    str(bench / "videos"), "--out", str(out), *SMALL, "--memory", "window", "--ratio", "0.5")
    assert code == 2 and "another configuration" in capsys.readouterr().err


def test_missing_and_corrupt_videos_are_error_lines(capsys, bench, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "vid1.mp4").symlink_to(bench / "videos" / "vid1.mp4")
    (videos / "vid3.mp4").write_bytes(np.random.default_rng(0).bytes(5000))  # vid2 is missing
    summary, lines = evaluate(capsys, bench / "questions.jsonl", videos, tmp_path / "out.jsonl", "--memory", "full")
    assert len(lines) == 9 and summary["errors"] == 6 and summary["questions"] == 9
    for line in lines:
        assert LINE_FIELDS <= set(line)
        if line["video"] == "vid1":
            assert line["error"] is None
        else:
            assert line["correct"] is False and line["prediction"] is None and line["video"] in line["error"]
    assert "no video file for videoID 'vid2'" in lines[3]["error"] and "vid2.mp4, vid2.mkv" in lines[3]["error"]
    assert "not a media file" in lines[6]["error"]
    check_summary(summary, lines)


def test_every_video_missing_is_an_error_and_fresh_lines_are_not_called_rescored(capsys, bench, tmp_path, caplog):
    """With no video found the run exits 1 and says so (it printed a 0.0% table and exited 0), and the log does
    not claim that the new error lines "were scored by strict" (lines of this run are this run's)."""
    empty = tmp_path / "videos"
    empty.mkdir()
    code = streamer("eval", "videomme", "--questions", str(bench / "questions.jsonl"), "--videos", str(empty),
                    "--out", str(tmp_path / "out.jsonl"), *SMALL, "--memory", "full")
    assert code == 1
    assert "none of the 9 questions could be answered" in capsys.readouterr().err
    assert "scored again" not in caplog.text
    streamer("eval", "videomme", "--questions", str(bench / "questions.jsonl"), "--videos", str(empty),
             "--out", str(tmp_path / "out2.jsonl"), "--model", "builtin", "--limit", "1")
    assert "--model builtin-choice" in caplog.text  # the builtin model answers in words: the hint


def test_resume_evaluates_error_lines_again(capsys, bench, tmp_path, count_calls):
    videos = tmp_path / "videos"
    videos.mkdir()
    for video in ("vid1.mp4", "vid3.mkv"):
        (videos / video).symlink_to(bench / "videos" / video)  # vid2 is missing at first
    out = tmp_path / "out.jsonl"
    summary, lines = evaluate(capsys, bench / "questions.jsonl", videos, out, "--memory", "full")
    assert summary["errors"] == 3 and count_calls["answer"] == 6
    (videos / "vid2.mp4").symlink_to(bench / "videos" / "vid2.mp4")
    summary, lines = evaluate(capsys, bench / "questions.jsonl", videos, out, "--memory", "full")
    assert count_calls["answer"] == 9  # only vid2's three questions ran again
    assert summary["errors"] == 0 and len(lines) == 9 and all(line["error"] is None for line in lines)
    assert [line["question_id"] for line in lines] == [r["question_id"] for r in records()]
    check_summary(summary, lines)


def test_out_of_memory_on_one_video_is_error_lines(capsys, bench, tmp_path, monkeypatch):
    original, calls = Runner.answer, []

    def answer(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "answer", answer)
    summary, lines = evaluate(capsys, bench / "questions.jsonl", bench / "videos", tmp_path / "out.jsonl",
                              "--memory", "full")
    assert [line["error"] is None for line in lines] == [True, False, False, True, True, True, True, True, True]
    assert "out of memory" in lines[1]["error"] and summary["errors"] == 2


def test_prompt_is_lmms_evals():
    question = Question("001-1", "vid", "short", "Knowledge", "Astronomy", "Counting Problem", "How many?",
                        ("A. 1", "B. 2", "C. 3", "D. 4"), "B")
    assert build_prompt(question) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many?\nA. 1\nB. 2\nC. 3\nD. 4\n\n"
        "Answer with the option's letter from the given choices directly.")


def test_questions_file_errors(tmp_path, monkeypatch):
    rows = records()
    del rows[4]["task_type"], rows[4]["options"]
    with pytest.raises(ValueError, match="record 5: missing field.s. task_type, options"):
        load_questions(write_jsonl(tmp_path / "q.jsonl", rows))
    with pytest.raises(ValueError, match="answer must be one of the option letters"):
        load_questions(write_jsonl(tmp_path / "q.jsonl", [{**records()[0], "answer": "E"}]))
    with pytest.raises(ValueError, match="question_id repeated: vid1-0"):
        load_questions(write_jsonl(tmp_path / "q.jsonl", records()[:1] * 2))
    (tmp_path / "q.json").write_text('{"videoID": "x"}')
    with pytest.raises(ValueError, match="not a list of records"):
        load_questions(tmp_path / "q.json")
    (tmp_path / "q.json").write_text(json.dumps(records()))
    assert len(load_questions(tmp_path / "q.json")) == 9
    (tmp_path / "q.csv").write_text("videoID\n")
    with pytest.raises(ValueError, match="use .parquet, .json"):
        load_questions(tmp_path / "q.csv")
    with pytest.raises(FileNotFoundError, match="no such questions file"):
        load_questions(tmp_path / "none.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    pytest.importorskip("pyarrow")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_questions(tmp_path / "bad.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'video-streamer\[eval\]'"):
        load_questions(tmp_path / "bad.parquet")


def test_bad_arguments_are_clear_errors(capsys, bench, tmp_path):
    base = ["eval", "videomme", "--questions", str(bench / "questions.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert streamer(*base, "--videos", str(tmp_path / "nowhere"), *SMALL) == 2
    assert "--videos takes the folder" in capsys.readouterr().err
    assert streamer(*base, "--videos", str(bench / "videos"), *SMALL, "--limit", "0") == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert streamer(*base, "--videos", str(bench / "videos"), *SMALL, "--chunk-frames", "3") == 2
    assert "multiple of 2" in capsys.readouterr().err


def test_shard_covers_every_video_once():
    videos = [f"v{i}" for i in range(11)]
    shards = [shard(videos, rank, 4) for rank in range(4)]
    assert sorted(v for s in shards for v in s) == sorted(videos)
    assert [len(s) for s in shards] == [3, 3, 3, 2]
    with pytest.raises(ValueError):
        shard(videos, 4, 4)


def test_merge_results(tmp_path):
    out = tmp_path / "results.jsonl"
    def line(question_id, tag):
        return json.dumps(dict(question_id=question_id, tag=tag)) + "\n"

    out.write_text(line("q2", "out"))
    rank_path(out, 0).write_text(line("q3", "r0") + line("q1", "r0"))
    rank_path(out, 1).write_text(line("q2", "r1") + line("q4", "r1") + '{"question_id": "q5"')  # q5 unfinished
    assert rank_path(out, 1).name == "results.rank1.jsonl" and rank_paths(out) == [rank_path(out, 0), rank_path(out, 1)]
    merge_results(out, rank_paths(out), ["q1", "q2", "q3"])
    assert [(r["question_id"], r["tag"]) for r in read_results(out)] == [
        ("q1", "r0"), ("q2", "out"), ("q3", "r0"), ("q4", "r1")]
    assert not rank_paths(out) and not (tmp_path / "results.jsonl.tmp").exists()


def test_distributed_from_torchrun_env():
    assert Distributed.from_env({}) == Distributed(0, 1, 0)
    dist = Distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert dist == Distributed(3, 4, 1)
    assert dist.device("cuda") == "cuda:1" and dist.device("cpu") == "cpu" and dist.device("cuda:0") == "cuda:0"
    assert dist.device("auto") == ("cuda:1" if torch.cuda.is_available() else "cpu")
    assert Distributed().device("auto") == "auto"
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        Distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_summarize_counts_errors_as_wrong():
    def line(video, duration, correct, error=None):
        return dict(video=video, duration=duration, task_type="T", correct=correct, error=error, memory_tokens=10,
                    full_tokens=40, timings=dict(total=1.5))

    summary = summarize([line("a", "short", True), line("a", "short", False), line("b", "long", False, "gone")])
    assert summary["accuracy"] == pytest.approx(100 / 3) and summary["errors"] == 1
    assert summary["mean_retention"] == 0.25 and summary["mean_seconds_per_video"] == 3.0  # video b failed


def test_prefetch_reads_ahead_in_order_with_errors_per_item():
    started = []

    def load(item):
        started.append(item)
        if item == 2:
            raise VideoError(f"video {item} is broken")
        return item * 10

    seen = []
    for entry in prefetch(range(5), load, depth=1):
        if entry.item == 0:  # while the caller works on item 0, the reader loads item 1 (and 2), no further
            deadline = time.monotonic() + 5
            while len(started) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
            assert started == [0, 1, 2]
        seen.append((entry.item, entry.value, str(entry.error) if entry.error else None))
    assert seen == [(0, 0, None), (1, 10, None), (2, None, "video 2 is broken"), (3, 30, None), (4, 40, None)]


def test_prefetch_stops_when_the_caller_leaves():
    entries = prefetch(range(1000), lambda item: item, depth=2)
    assert next(entries).item == 0
    entries.close()
    deadline = time.monotonic() + 5
    while any(t.name == "video-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "video-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("size, preset, stored", [
    ((360, 640), VisionPreset(112896, 112896), (252, 448)),  # 16:9 at 144 tokens per pair: stored small
    ((112, 112), VisionPreset(12544, 12544), (112, 112)),  # already at model size
    ((100, 178), VisionPreset(112896, 112896), (100, 178)),  # upscale overshoots: smart_resize not idempotent
])
def test_resized_frames_preprocess_exactly_like_the_originals(size, preset, stored):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(3)]
    resized = resize_frames(frames, preset)
    assert resized[0].shape == (*stored, 3) and resized[0].dtype == np.uint8
    a, b = preprocess_frames(frames, preset), preprocess_frames(resized, preset)
    assert a.grid_thw == b.grid_thw and torch.equal(a.pixel_values, b.pixel_values)


def test_the_preset_does_not_choose_the_model_and_random_weights_say_so(bench, tmp_path, caplog):
    config = load_config("videomme_emloc")
    assert config.model.name == "builtin" and config.video.spread == "linspace"
    with caplog.at_level(logging.WARNING, logger="streamer"):
        load_runner(override(load_config("videomme_emloc"), "model", name="tiny-random", device="cpu"))
    assert "RANDOM WEIGHTS" in caplog.text


def test_linspace_frames_run_first_to_last():
    assert Sampling(frames=4, spread="linspace").indices([i / 8 for i in range(10)]) == [0, 3, 6, 9]
    assert Sampling(frames=4).indices([i / 8 for i in range(10)]) == [1, 3, 6, 8]
    assert linspace_indices(3, 5) == [0, 1, 2]
    with pytest.raises(ValueError, match="spread"):
        Sampling(frames=4, spread="edges")
