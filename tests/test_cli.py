"""`streamer ask` and `streamer make-video` end to end on the tiny model."""

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import live_http, ts_parts

from streamer.cli import main
from streamer.engine.models import load_model

SMALL = ["--model", "tiny-random", "--min-pixels", str(56 * 112), "--max-pixels", str(56 * 112), "--device", "cpu"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "clip.mp4"
    assert main(["make-video", str(path), "--frames", "30", "--fps", "10", "--size", "112x56"]) == 0
    return path


def ask_json(capsys, video, *switches):
    code = main(["-q", "ask", str(video), "What happens in the video?", "--json", *SMALL, *switches])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_ask_json_fields_and_chunk_invariance(capsys, video):
    small = ask_json(capsys, video, "--frames", "12", "--chunk-frames", "4", "--max-new-tokens", "5")
    whole = ask_json(capsys, video, "--frames", "12", "--chunk-frames", "10000", "--max-new-tokens", "5")
    for field in ("answer", "frames", "full_tokens", "memory_tokens", "memory_tokens_per_layer",
                  "first_token_logprobs", "timings"):
        assert field in small
    assert small["frames"] == 12 and len(small["chunks"]) == 3 and len(whole["chunks"]) == 1
    prefix_tokens = small["full_tokens"] - 6 * 8  # 6 frame pairs of 8 tokens each
    assert prefix_tokens > 0
    assert small["memory_tokens"] == small["full_tokens"]
    assert small["memory_tokens_per_layer"] == [small["full_tokens"]] * 6
    assert len(small["first_token_logprobs"]) == 5
    for a, b in zip(small["first_token_logprobs"], whole["first_token_logprobs"]):
        assert a["id"] == b["id"]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
    assert small["answer"] == whole["answer"]
    assert set(small["timings"]) >= {"load_model", "read_frames", "vision", "prefill", "question_prefill", "decode"}


def test_ask_on_qwen3_is_chunk_invariant(capsys, video):
    """Qwen3-VL at its own resolution (frames resized to 64 x 128) and the file's sampled rate, whose frame
    times are text in every chunk: chunks of 4 frames answer as the whole video at once."""
    qwen3 = ["--model", "tiny-random-qwen3-vl", "--min-pixels", str(64 * 128), "--max-pixels", str(64 * 128)]
    small = ask_json(capsys, video, "--frames", "11", "--chunk-frames", "4", "--max-new-tokens", "3", *qwen3)
    whole = ask_json(capsys, video, "--frames", "11", "--chunk-frames", "10000", "--max-new-tokens", "3", *qwen3)
    assert len(small["chunks"]) == 3 and small["full_tokens"] == whole["full_tokens"]
    for a, b in zip(small["first_token_logprobs"], whole["first_token_logprobs"]):
        assert a["id"] == b["id"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
    assert small["answer"] == whole["answer"]


def test_ask_fps_sampling(capsys, video):
    result = ask_json(capsys, video, "--fps", "2", "--max-frames", "5", "--chunk-frames", "2", "--max-new-tokens", "1")
    assert result["frames"] == 5  # 3 s at 2 fps is 6 frames, capped to 5 uniform frames


@pytest.mark.parametrize("switches, message", [
    (["--chunk-frames", "3"], "multiple of 2"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--config", "no-such-config"], "no config file"),
    (["--model", "/no/such/checkpoint"], "no Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint"),
])
def test_ask_bad_options_are_clear_errors(capsys, video, switches, message):
    assert main(["-q", "ask", str(video), "Q?", *SMALL, *switches]) == 2
    assert message in capsys.readouterr().err


def test_ask_reads_a_stream_url_for_some_seconds(capsys, tmp_path):
    """`ask` takes a live URL (it said "no such file"): --seconds of it at --fps, then the answer."""
    parts = ts_parts(tmp_path, count=1, frames=24)  # 3 s at 8 fps
    with live_http(parts * 2, then="stall") as url:  # opened to check it, then to read it
        result = ask_json(capsys, url, "--fps", "4", "--seconds", "2", "--chunk-frames", "4")
    assert result["frames"] == 8 and result["video"] == url and len(result["chunks"]) == 2


@pytest.mark.parametrize("switches, message", [
    ([], "give --seconds S or --max-frames N"),
    (["--frames", "8", "--seconds", "2"], "a stream URL has none: give --fps F"),
    (["--seconds", "2"], "cannot open the stream"),
])
def test_ask_checks_a_stream_url_before_loading_the_model(capsys, monkeypatch, switches, message):
    def load_runner(config):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("streamer.cli.ask.load_runner", load_runner)
    assert main(["-q", "ask", "http://127.0.0.1:9/live.ts", "Q?", *SMALL, *switches]) == 2
    assert message in capsys.readouterr().err


def test_ask_missing_video(capsys, tmp_path):
    assert main(["-q", "ask", str(tmp_path / "missing.mp4"), "Q?", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "missing.mp4" in err


@pytest.mark.parametrize("destination, message", [("nodir/m.safetensors", "no folder"), (".", "is a directory")])
def test_ask_refuses_a_destination_it_cannot_write_before_any_work(capsys, video, tmp_path, destination, message):
    assert main(["-q", "ask", str(video), "Q?", *SMALL, "--save-memory", str(tmp_path / destination)]) == 2
    err = capsys.readouterr().err
    assert f"--save-memory {tmp_path / destination}" in err and message in err


def test_console_entry_point_text_output(video):
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "ask", str(video), "What happens?", *SMALL, "--frames", "4",
         "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "chunk 1/1" in result.stderr  # progress is shown
    assert "memory" in result.stderr and "tokens" in result.stderr


def test_emloc_through_the_cli_reports_chunks(capsys, video):
    result = ask_json(capsys, video, "--frames", "12", "--chunk-frames", "4", "--memory", "emloc", "--delta", "0.5",
                      "--ratios", "0.1,1.0", "--group-size", "4", "--max-new-tokens", "2")
    assert result["policy"] == "emloc" and result["probe"] == "generic"
    assert result["memory_tokens"] < result["full_tokens"]
    assert len(result["chunks"]) == 3
    for chunk in result["chunks"]:
        assert len(chunk["ratios"]) == len(chunk["js"]) == 2  # groups of 4 layers over 6: [0-3], [4-5]
        assert len(chunk["kept"]) == 6
        assert all(js <= 0.5 for js in chunk["js"])
        assert {"prefill", "probe", "search"} <= set(chunk["timings"])


@pytest.mark.parametrize("policy", ["uniform", "pyramid", "window", "random"])
def test_baselines_through_the_cli(capsys, video, policy):
    result = ask_json(capsys, video, "--frames", "8", "--chunk-frames", "4", "--memory", policy, "--ratio", "0.25",
                      "--max-new-tokens", "1")
    assert result["policy"] == policy and result["memory_tokens"] < result["full_tokens"]


def test_budget_switch(capsys, video):
    result = ask_json(capsys, video, "--frames", "16", "--chunk-frames", "2", "--budget", "40", "--max-new-tokens", "1")
    layers = result["memory_tokens_per_layer"]
    assert sum(layers) <= 40 * len(layers) and result["evicted_tokens"] > 0  # the layers share the budget
    # the text output says what the budget left of each quarter of the stream
    assert main(["-q", "ask", str(video), "Q?", *SMALL, "--frames", "16", "--chunk-frames", "2", "--budget", "40",
                 "--max-new-tokens", "1"]) == 0
    assert "held of what the policy kept, by quarter of the stream" in capsys.readouterr().err


def test_recall_switch_keeps_evicted_tokens_and_serve_refuses_it(capsys, video, tmp_path):
    args = ("--frames", "16", "--chunk-frames", "2", "--budget", "40", "--max-new-tokens", "1")
    plain = ask_json(capsys, video, *args)
    kept = ask_json(capsys, video, *args, "--recall", "20")
    # the device memory is the same; the answer may read recalled chunks
    assert kept["memory_tokens_per_layer"] == plain["memory_tokens_per_layer"] and kept["evicted_tokens"] > 0
    assert main(["-q", "ask", str(video), "Q?", *SMALL, *args, "--recall", "-1"]) == 2
    assert "memory.recall must be a token count >= 0" in capsys.readouterr().err
    config = tmp_path / "recall.toml"
    config.write_text("[memory]\npolicy = \"full\"\nbudget = 100\nrecall = 10\n")
    assert main(["-q", "serve", "--config", str(config), "--model", "tiny-random"]) == 2
    assert "memory.recall needs memory.host_budget in a served config" in capsys.readouterr().err


def test_saved_memory_answers_without_the_video(capsys, video, tmp_path):
    path = tmp_path / "memory.safetensors"
    asked = ask_json(capsys, video, "--frames", "8", "--chunk-frames", "4", "--memory", "emloc", "--delta", "0.5",
                     "--max-new-tokens", "4", "--save-memory", str(path))
    assert asked["memory_file"] == str(path) and path.is_file()
    code = main(["-q", "answer", str(path), "What happens in the video?", "--json", "--device", "cpu",
                 "--max-new-tokens", "4"])
    answered = json.loads(capsys.readouterr().out)
    assert code == 0
    assert answered["answer"] == asked["answer"]
    assert answered["first_token_logprobs"] == asked["first_token_logprobs"]
    assert answered["memory_tokens_per_layer"] == asked["memory_tokens_per_layer"]


def test_answer_refuses_a_non_snapshot(capsys, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello")
    assert main(["-q", "answer", str(path), "Q?", "--device", "cpu"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_ratio_switch_needs_a_baseline(capsys, video):
    assert main(["-q", "ask", str(video), "Q?", *SMALL, "--memory", "emloc", "--ratio", "0.2"]) == 2
    assert "--ratio applies to" in capsys.readouterr().err


def test_a_snapshot_made_with_a_relative_model_path_answers_from_another_directory(capsys, video, tmp_path,
                                                                                  monkeypatch):
    loaded = load_model("tiny-random", device="cpu")
    (tmp_path / "work" / "ckpt").mkdir(parents=True)
    loaded.model.save_pretrained(tmp_path / "work" / "ckpt")
    loaded.tokenizer.save_pretrained(tmp_path / "work" / "ckpt")
    monkeypatch.chdir(tmp_path / "work")
    switches = [s if s != "tiny-random" else "ckpt" for s in SMALL]
    code = main(["-q", "ask", str(video), "What happens?", "--json", *switches, "--frames", "4",
                 "--max-new-tokens", "2", "--save-memory", "memory.safetensors"])
    asked = json.loads(capsys.readouterr().out)
    assert code == 0
    monkeypatch.chdir(tmp_path)  # "ckpt" means nothing here
    code = main(["-q", "answer", "work/memory.safetensors", "What happens?", "--json", "--device", "cpu",
                 "--max-new-tokens", "2"])
    answered = json.loads(capsys.readouterr().out)
    assert code == 0 and answered["answer"] == asked["answer"]
    assert answered["model"] == str((tmp_path / "work" / "ckpt").resolve())


def test_a_whole_video_pixel_budget_shrinks_its_frames(capsys, video):
    switches = ["--model", "tiny-random", "--device", "cpu", "--min-pixels", "784", "--max-pixels", str(56 * 112),
                "--frames", "4", "--chunk-frames", "4", "--max-new-tokens", "1"]
    code = main(["-q", "ask", str(video), "Q?", "--json", *switches])
    whole = json.loads(capsys.readouterr().out)
    code_budget = main(["-q", "ask", str(video), "Q?", "--json", *switches, "--total-pixels", str(2 * 56 * 56)])
    budget = json.loads(capsys.readouterr().out)
    assert code == code_budget == 0
    # 4 frames share 6272 pixels: at most 6272 / 4 x 2 = 3136 each, so 56x112 frames become 28x56, 2 tokens
    # per frame pair instead of 8, over 2 pairs
    assert whole["full_tokens"] - budget["full_tokens"] == 2 * (8 - 2)


def test_version(capsys):
    """`streamer --version` prints the version pyproject.toml gives the installed package, and exits 0."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"streamer {project['version']}"


def test_every_help_shows_defaults_and_quiet_goes_after_the_subcommand(capsys):
    from streamer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ask", "v.mp4", "Q?", "-q"]).quiet and parser.parse_args(["-q", "ask", "v.mp4", "Q?"]).quiet
    assert not parser.parse_args(["ask", "v.mp4", "Q?"]).quiet
    assert parser.parse_args(["eval", "videomme", "--questions", "q.parquet", "--videos", "v", "-q"]).quiet
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8765)" in text and "(default: 127.0.0.1)" not in text  # its help says it already


def test_training_refuses_to_overwrite_weights_without_force(tmp_path, capsys):
    from streamer.builtin.train import main as train_main

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit) as exit_:
        train_main(["--out", str(tmp_path), "--scale", "0.0001"])
    assert exit_.value.code == 2 and "holds weights already" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


def test_make_video_writes_a_builtin_video_and_its_questions(tmp_path, capsys):
    from streamer.builtin.videos import make_video

    assert main(["make-video", str(tmp_path / "b.mp4"), "--builtin", "7", "--frames", "32"]) == 0
    out = capsys.readouterr().out
    for qa in make_video(7, 32).questions():
        assert f"{qa.question}  ->  {qa.answer}" in out
    assert "at 2 fps" in out and (tmp_path / "b.mp4").stat().st_size > 0


def test_words_for_people(caplog, capsys):
    """Counts agree with their nouns, ratios are rounded in progress lines, an empty answer says so."""
    import logging

    from streamer.cli.ask import print_result
    from streamer.service.client import log_event
    from streamer.text import counted

    assert [counted(n, "session") for n in (0, 1, 2)] == ["0 sessions", "1 session", "2 sessions"]
    with caplog.at_level(logging.INFO, logger="streamer"):
        log_event(dict(type="progress", frames=8, chunks=2, memory_tokens=40.0, full_tokens=80,
                       ratios=[0.123456789, 1.0]))
    assert "ratios 0.123 1" in caplog.text and "0.1234" not in caplog.text
    print_result(dict(answer=" ", frames=8, memory_tokens=40.0, full_tokens=80, timings=dict(question_prefill=0.01)),
                 as_json=False)
    assert "(an empty answer" in capsys.readouterr().out


def test_the_command_line_loads_only_the_command_it_runs():
    """`streamer --help` and `streamer client --help` load no torch (importing every command took seconds); each
    command's one-line help is the one its module gives."""
    from streamer.cli import COMMANDS, build_parser

    parser = build_parser()
    [choices] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert {a.dest: a.help for a in choices._choices_actions} == {name: text for name, (_, text) in COMMANDS.items()}
    for argv in (["--help"], ["client", "--help"]):
        code = f"import sys; from streamer.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n" \
               "print('LOADED', sorted({'torch', 'transformers'} & set(sys.modules)))"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "LOADED []" in result.stdout, (argv, result.stdout[-300:], result.stderr[-300:])
