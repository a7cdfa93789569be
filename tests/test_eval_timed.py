"""OVO-Bench and StreamingBench: their files, prompts and scoring rules, worked by hand from their scripts."""

import json

import pytest

from streamer.evaluation import ovobench, streamingbench
from streamer.evaluation import timed
from streamer.evaluation.timed import TimedQuestion, ask_order

OVO_ITEMS = [
    {"id": 0, "task": "EPM", "video": "Ego4D/a.mp4", "realtime": 215.4, "question": "Who?",
     "options": ["red", "green", "blue"], "gt": 2},
    {"id": 7, "task": "STU", "video": "Games/b.mp4", "realtime": 12, "question": "Where?",
     "options": ["left", "right"], "gt": 0},
    {"id": 1516, "task": "SSR", "video": "COIN/c.mp4", "test_info": [
        {"realtime": 27, "step": "pull up the hair", "type": 1}, {"realtime": 26, "step": "comb", "type": 0}]},
    {"id": 1558, "task": "REC", "video": "pt/d.mp4", "activity": "breaking something",
     "test_info": [{"realtime": 17, "count": 1}, {"realtime": 32.0, "count": 3}]},
    {"id": 1468, "task": "CRR", "video": "MovieNet/e.mp4", "question": "What does she do to the car?",
     "test_info": [{"realtime": 297, "type": 0}, {"realtime": 310, "type": 1}]},
]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_ovobench_file_is_read_as_its_script_reads_it(tmp_path):
    questions = {q.id: q for q in ovobench.load_questions(write(tmp_path, "ovo.json", OVO_ITEMS))}
    assert list(questions) == ["0", "7", "1516_0", "1516_1", "1558_0", "1558_1", "1468_0", "1468_1"]
    epm = questions["0"]
    assert (epm.category, epm.time, epm.clip_end, epm.answer) == ("backward", 215.4, 216, "C")
    assert "Options:\nA. red; B. green; C. blue;\n" in epm.prompt and epm.prompt.startswith("\nQuestion: Who?\n")
    assert questions["7"].category == "realtime" and questions["7"].answer == "A"
    assert "pull up the hair" in questions["1516_0"].prompt and questions["1516_0"].answer == "Yes"
    assert questions["1516_1"].answer == "No" and questions["1516_1"].time == 26
    assert "How many times did they breaking something?" in questions["1558_1"].prompt
    assert questions["1558_1"].answer == "3" and questions["1468_1"].answer == "Yes"
    assert [q.id for q in ask_order([questions["1516_0"], questions["1516_1"]])] == ["1516_1", "1516_0"]


@pytest.mark.parametrize("items, message", [
    ({"id": 0}, "non-empty list"),
    ([{"id": 3, "task": "XYZ", "video": "v.mp4"}], "unknown OVO-Bench task"),
    ([{"id": 4, "task": "EPM", "video": "v.mp4", "question": "q", "options": ["a"]}], "item 0 .id 4."),
])
def test_ovobench_bad_files_say_what_is_wrong(tmp_path, items, message):
    with pytest.raises(ValueError, match=message):
        ovobench.load_questions(write(tmp_path, "bad.json", items))


def ovo(task, answer, category=None):
    category = category or ovobench.category_of(task)
    return TimedQuestion(id="1", video="v", task=task, category=category, time=1, clip_end=1, prompt="", answer=answer)


@pytest.mark.parametrize("task, answer, reply, correct", [
    ("EPM", "B", "B", True),
    ("EPM", "B", "b", False),  # the letter must appear as it is
    ("EPM", "A", "B", False),
    ("HLD", "B", "Both A and B are possible", True),  # OVOBenchScore: the letter anywhere in the reply
    ("OCR", "C", "The answer is (C).", True),
    ("REC", "3", "3", True),
    ("REC", "3", "They did it 3 times.", True),
    ("REC", "1", "1 or 2", False),  # digits joined: "12"
    ("REC", "0", "none", False),
    ("SSR", "Yes", "Y", True),
    ("SSR", "No", "N", True),
    ("SSR", "Yes", "Yes.", True),
    ("SSR", "Yes", "No", False),
    ("CRR", "No", "Not yet. No", True),
    ("CRR", "Yes", "yes", False),  # case matters
])
def test_ovobench_scoring_follows_its_script(task, answer, reply, correct):
    assert ovobench.score(ovo(task, answer), reply)[1] is correct


def test_ovobench_averages_both_ways():
    records = [dict(task=t, correct=c) for t, c in [
        ("EPM", True), ("EPM", False), ("ASI", True),  # backward: (50 + 100) / 2 = 75
        ("STU", False), ("OCR", True), ("OCR", True),  # realtime: (0 + 100) / 2 = 50
        ("REC", True), ("REC", False), ("REC", False), ("REC", False)]]  # forward: 25
    summary = ovobench.summarize(records)
    assert summary["tasks"]["EPM"]["accuracy"] == 50 and summary["tasks"]["OCR"]["questions"] == 2
    assert summary["categories"] == {"backward": 75, "realtime": 50, "forward": 25}
    assert summary["overall_backward_realtime"] == 62.5 and summary["overall_all"] == 50
    assert "overall, all three (mean of category averages): 50.0%" in ovobench.format_table(summary)
    partial = ovobench.summarize(records[:3])
    assert partial["overall_all"] is None and partial["categories"]["realtime"] is None


REAL = [{"time": "[0:00:00 - 0:00:10]", "video_path": "./videos/sample_348_real.mp4", "questions": [
    {"task_type": "Clips Summarize", "question": "What just happened?", "time_stamp": "00:00:31", "answer": "C",
     "options": ["A. one", "B. two", "C. three", "D. four"]},
    {"task_type": "Counting", "question": "How many?", "time_stamp": "00:03:26", "answer": "A",
     "options": ["A. 1", "B. 2", "C. 3", "D. 4"]}]}]
SQA = [[{"video_path": "./videos/sample_17_sqa.mp4", "questions": [
    {"task_type": "Sequential Question Answering", "question": "Who serves?", "time_stamp": "00:00:36",
     "answer": "A", "options": ["Wang.", "Fan.", "Xu.", "Ma."]}]},
    {"video_path": "./videos/sample_17_sqa.mp4", "questions": [
        {"task_type": "Sequential Question Answering", "question": "His score now?", "time_stamp": "00:03:02",
         "answer": "C", "options": ["2.", "6.", "7.", "4."]}]}]]


def test_streamingbench_files_and_prompts(tmp_path):
    first, second = streamingbench.load_questions(write(tmp_path, "real.json", REAL))
    assert (first.id, first.time, first.clip_end, first.answer) == ("0.0", 31, 31, "C")
    assert second.time == 3 * 60 + 26 and second.task == "Counting"
    assert "Question: What just happened?\n\nOptions:\nA. one\nB. two\nC. three\nD. four\n\nThe best option is:" \
        in first.prompt
    one, two = streamingbench.load_questions(write(tmp_path, "sqa.json", SQA))
    assert (one.id, two.id) == ("0.0.0", "0.1.0")
    assert "A. Wang." in one.prompt and "contextual information" not in one.prompt
    assert ("At timestamp 00:00:36, the following question and answer occurred: Question: Who serves?; Options: "
            "A. Wang., B. Fan., C. Xu., D. Ma.; Answer: A; ") in two.prompt
    proactive = [{"video_path": "v.mp4", "questions": [{"task_type": "Proactive Output", "question": "q",
                                                        "time_stamp": "00:00:20", "ground_truth_time_stamp": "00:00:29",
                                                        "ground_truth_output": "3"}]}]
    with pytest.raises(ValueError, match="proactive"):
        streamingbench.load_questions(write(tmp_path, "proactive.json", proactive))


@pytest.mark.parametrize("reply, correct", [
    ("C", True), ("C. three", True), ("c", False), (" C", False), ("The best option is C", False), ("", False),
])
def test_streamingbench_scores_the_first_character(reply, correct):
    question = TimedQuestion(id="0.0", video="v", task="t", category="", time=1, clip_end=1, prompt="", answer="C")
    assert streamingbench.score(question, reply)[1] is correct


def test_streamingbench_summary():
    records = [dict(task="Counting", correct=True), dict(task="Counting", correct=False),
               dict(task="Clips Summarize", correct=True)]
    summary = streamingbench.summarize(records)
    assert summary["tasks"]["Counting"]["accuracy"] == 50 and summary["overall"]["accuracy"] == pytest.approx(200 / 3)


# --- end to end on generated videos: 24 frames at 4 fps, read at 2 fps --------------------------------------

SWITCHES = ["--model", "tiny-random", "--device", "cpu", "--chunk-frames", "4",
            "--min-pixels", "12544", "--max-pixels", "12544"]
UNIFORM = ["--memory", "uniform", "--ratio", "0.5"]
LINE_FIELDS = {"id", "video", "task", "category", "time", "frames_seen", "last_frame_time", "reply", "prediction",
               "answer", "correct", "memory_tokens", "full_tokens", "ttft_s", "timings", "error", "config_id"}


def ovo_items(video, first_id):
    return [
        {"id": first_id, "task": "EPM", "video": video, "realtime": 2.5, "question": "Which colour?",
         "options": ["red", "green", "blue", "grey"], "gt": 1},
        {"id": first_id + 1, "task": "STU", "video": video, "realtime": 5.0, "question": "Where?",
         "options": ["left", "right"], "gt": 0},
        {"id": first_id + 2, "task": "REC", "video": video, "activity": "jump",
         "test_info": [{"realtime": 2.75, "count": 2}, {"realtime": 1.0, "count": 1}]},
    ]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from video_io.synthetic import write_video

    root = tmp_path_factory.mktemp("timed")
    (root / "clips").mkdir()
    write_video(root / "clips" / "a.mp4", 24, fps=4.0)
    write_video(root / "clips" / "b.mp4", 24, fps=4.0, size=(112, 128))
    return root


def streamer(capsys, benchmark, questions, videos, out, *switches):
    from streamer.cli import main

    code = main(["-q", "eval", benchmark, "--questions", str(questions), "--videos", str(videos), "--out", str(out),
                 "--json", *SWITCHES, *([] if "--frames" in switches else ["--fps", "2"]), *(switches or UNIFORM)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    from streamer.evaluation.results import read_results

    return json.loads(captured.out), {line["id"]: line for line in read_results(out, "id")}


def test_streaming_answers_see_no_frame_after_their_time(capsys, videos, tmp_path):
    """The same questions answered with and without a later one: a question asked by 2.75 s gets the same
    answer whether or not the stream goes on to 5 s afterwards, so no later frame reached its memory."""
    items = ovo_items("clips/a.mp4", 0) + ovo_items("clips/b.mp4", 10)
    summary, lines = streamer(capsys, "ovobench", write(tmp_path, "ovo.json", items), videos, tmp_path / "all.jsonl")
    assert list(lines) == ["0", "1", "2_0", "2_1", "10", "11", "12_0", "12_1"]
    for line in lines.values():
        assert LINE_FIELDS <= set(line) and line["error"] is None
        assert line["last_frame_time"] <= line["time"] and line["frames_seen"] == int(line["time"] / 0.5) + 1
        assert line["correct"] == ovobench.score(ovo(line["task"], line["answer"]), line["reply"])[1]
    assert lines["1"]["frames_seen"] == 11 and lines["2_1"]["frames_seen"] == 3
    assert summary["questions"] == 8 and summary["errors"] == 0 and summary["mode"] == "stream"
    assert set(summary["tasks"]) == {"EPM", "STU", "REC"} and summary["tasks"]["REC"]["questions"] == 4
    early = [item for item in items if item["task"] != "STU"]  # without the questions at 5 s
    _, alone = streamer(capsys, "ovobench", write(tmp_path, "early.json", early), videos, tmp_path / "early.jsonl")
    for name in ("0", "2_0", "2_1", "10", "12_0", "12_1"):
        assert alone[name]["reply"] == lines[name]["reply"] and alone[name]["memory_tokens"] == lines[name]["memory_tokens"]


def test_clip_mode_resume_and_missing_videos(capsys, videos, tmp_path, monkeypatch):
    from streamer.engine.runner import Runner

    calls = {"new_memory": 0}
    original = Runner.new_memory
    monkeypatch.setattr(Runner, "new_memory", lambda self, *a, **k: calls.__setitem__("new_memory", calls["new_memory"] + 1) or original(self, *a, **k))
    questions = write(tmp_path, "ovo.json", ovo_items("clips/a.mp4", 0) + ovo_items("later.mp4", 10))
    out = tmp_path / "clip.jsonl"
    summary, lines = streamer(capsys, "ovobench", questions, videos, out, "--mode", "clip", *UNIFORM)
    assert calls["new_memory"] == 4, "a fresh memory per question"
    assert lines["0"]["frames_seen"] == 7, "the clip ends at ceil(2.5) = 3 s, as OVO-Bench cuts it"
    assert lines["2_1"]["frames_seen"] == 3 and lines["1"]["frames_seen"] == 11
    assert all(lines[i]["error"].startswith("not found in") for i in ("10", "11", "12_0", "12_1"))
    assert summary["errors"] == 4
    with pytest.raises(AssertionError, match="another configuration"):
        streamer(capsys, "ovobench", questions, videos, out)  # stream mode is another configuration
    import shutil

    shutil.copy(videos / "clips" / "b.mp4", videos / "later.mp4")
    try:
        summary, again = streamer(capsys, "ovobench", questions, videos, out, "--mode", "clip", *UNIFORM)
    finally:
        (videos / "later.mp4").unlink()
    assert calls["new_memory"] == 8, "only the failed questions ran again"
    assert summary["errors"] == 0 and [again[i] for i in ("0", "1")] == [lines[i] for i in ("0", "1")]
    assert list(again) == ["0", "1", "2_0", "2_1", "10", "11", "12_0", "12_1"]
    # a frame count in clip mode: N frames from the first to the last of each clip, as the papers sample clips
    _, counted = streamer(capsys, "ovobench", questions, videos, tmp_path / "n.jsonl", "--mode", "clip",
                          "--frames", "4", "--spread", "linspace", *UNIFORM)
    for name, cut in (("0", 3.0), ("1", 5.0), ("2_1", 1.0)):
        assert counted[name]["frames_seen"] == 4 and counted[name]["last_frame_time"] == cut
    with pytest.raises(AssertionError, match="streaming mode samples frames by rate"):
        streamer(capsys, "ovobench", questions, videos, tmp_path / "s.jsonl", "--frames", "4", *UNIFORM)


def test_streamingbench_end_to_end_with_the_recent_memory(capsys, videos, tmp_path):
    data = [{"video_path": "./videos/a.mp4", "questions": [
        {"task_type": "Counting", "question": "How many?", "time_stamp": "00:00:03", "answer": "A",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"]},
        {"task_type": "Object Recognition", "question": "What?", "time_stamp": "00:00:01", "answer": "B",
         "options": ["A. cat", "B. dog", "C. cow", "D. pig"]}]}]
    questions = write(tmp_path, "real.json", data)
    switches = ["--memory", "recent", "--recent-frames", "2"]
    summary, lines = streamer(capsys, "streamingbench", questions, videos / "clips", tmp_path / "sb.jsonl", *switches)
    assert lines["0.1"]["frames_seen"] == 3 and lines["0.0"]["frames_seen"] == 7
    assert lines["0.0"]["memory_tokens"] == lines["0.1"]["memory_tokens"], "two frames either way"
    assert summary["overall"]["questions"] == 2 and set(summary["tasks"]) == {"Counting", "Object Recognition"}
    with pytest.raises(AssertionError, match="outside the videos folder"):
        escaping = write(tmp_path, "escape.json", [{**data[0], "video_path": "../../etc/passwd"}])
        streamer(capsys, "streamingbench", escaping, videos / "clips", tmp_path / "e.jsonl", *switches)


def test_stream_and_clip_answer_alike_where_the_clip_ends_at_the_question(capsys, videos, tmp_path):
    """Questions at 1, 2 and 3 s (3, 5 and 7 frames, chunks of 4): mid-chunk each time, yet the one stream
    answers each as a memory built afresh up to it would, for no question leaves a short chunk behind."""
    data = [{"video_path": "a.mp4", "questions": [
        {"task_type": "Counting", "question": f"How many by {t} s?", "time_stamp": f"00:00:0{t}", "answer": "A",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"]} for t in (1, 2, 3)]}]
    questions = write(tmp_path, "alike.json", data)
    _, streamed = streamer(capsys, "streamingbench", questions, videos / "clips", tmp_path / "s.jsonl")
    _, clipped = streamer(capsys, "streamingbench", questions, videos / "clips", tmp_path / "c.jsonl",
                          "--mode", "clip", *UNIFORM)
    assert [line["frames_seen"] for line in streamed.values()] == [3, 5, 7]
    for name, line in streamed.items():
        assert (line["reply"], line["memory_tokens"]) == (clipped[name]["reply"], clipped[name]["memory_tokens"])


def test_the_sampled_rate_reaches_qwen25_vl_positions(capsys, videos, tmp_path, monkeypatch):
    """Qwen2.5-VL's time positions follow the sampling rate: each clip states the rate it was read at, and
    the stream's memory runs at it."""
    from streamer.config import load_config
    from memory.store import KVMemory
    from video_io.preprocess import VisionPreset

    config = load_config("stream_default")
    config.video.fps = 2.0
    clip = timed.read_until(videos / "clips" / "a.mp4", config, VisionPreset(), until=3.0)
    assert len(clip.frames) == 7 and clip.fps == pytest.approx(7 / 3.25)  # 13 of the 4 fps frames, 7 taken
    rates = []
    original = KVMemory.check_fps
    monkeypatch.setattr(KVMemory, "check_fps", lambda self, fps: rates.append(fps) or original(self, fps))
    data = [{"video_path": "a.mp4", "questions": [
        {"task_type": "Counting", "question": "How many?", "time_stamp": "00:00:03", "answer": "A",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"]}]}]
    _, lines = streamer(capsys, "streamingbench", write(tmp_path, "q.json", data), videos / "clips",
                        tmp_path / "q25.jsonl", "--model", "tiny-random-qwen2.5-vl", *UNIFORM)
    assert lines["0.0"]["error"] is None and rates and all(r == pytest.approx(7 / 3.25) for r in rates)
