"""OVO-Bench and StreamingBench question files on the builtin model's procedural videos.

    streamer make-sets sets/ --videos 20      # sets/videos/*.mp4, sets/ovo_bench_new.json, sets/questions_real.json

Each file is in its benchmark's own format (streamer/evaluation/ovobench.py, streamingbench.py), so
`streamer eval ovobench|streamingbench` runs on it exactly as on the real benchmark. The questions
are the builtin's families (videos.py) asked mid-stream: at the end of each episode, at a whole
second (StreamingBench's time stamps are HH:MM:SS) when the episode's last object has gone and the
next has not yet appeared. Every answer is worked out from the events up to that moment, so an
answer that used a later frame is wrong: "what appeared last" changes from one moment to the next.

Which benchmark task each family stands for:

    OVO-Bench       ASI (order of actions)  first        STU (spatial, now)   where, of the newest object
                    EPM (episodic memory)   where / duration / together, of an earlier object
                    OJR (object, now)       last         REC (forward, counting)  count at every moment
    StreamingBench  Event Understanding     first        Object Recognition   last
                    Spatial Understanding   where        Counting             count
                    Attribute Perception    together     Action Perception    duration
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from streamer.builtin.videos import (ASK, FRAME, QA, SyntheticVideo, count_activity, make_video, multiple_choice,
                                     where_of)
from streamer.engine.benchmark_prompts import lettered
from video_io.synthetic import write_video

FPS = 2.0  # the rate the videos are written at and should be read at (--fps 2): every frame, as trained
FIRST_SEED = 800000  # below the training seeds, apart from the synthetic evaluation's 0.. and 900000..


def moments(video: SyntheticVideo) -> list[tuple[int, SyntheticVideo]]:
    """(second, the video as seen by then) at the end of each episode: the first whole second at or after
    the episode's last frame, if the next episode has not started by then."""
    found = []
    for episode in sorted({e.episode for e in video.events}):
        seen = [k for k, e in enumerate(video.events) if e.episode <= episode]
        end = max(video.events[k].start + video.events[k].frames for k in seen)  # first frame after it
        second = int(np.ceil(end / FPS))
        frames = int(second * FPS) + 1  # frames 0 .. second * FPS
        if frames > video.num_frames or any(e.start < frames for e in video.events if e.episode > episode):
            continue
        found.append((second, SyntheticVideo(video.seed, frames, video.background,
                                             tuple(video.events[k] for k in seen),
                                             tuple(video.layout[k] for k in seen))))
    return found


def earlier(video: SyntheticVideo, rng: np.random.Generator) -> str:
    """A family about any object seen so far: where, duration, or (when some object had a companion) together."""
    paired = any(video.companion(e) is not None for e in video.events)
    return str(rng.choice(["where", "duration", "together"] if paired else ["where", "duration"]))


def ovobench_items(video: SyntheticVideo, name: str, first_id: int, rng: np.random.Generator) -> list[dict]:
    asked = moments(video)
    if not asked:
        return []
    items = []

    def choice(task: str, second: int, qa: QA) -> None:
        options, right = multiple_choice(qa, rng)
        items.append(dict(id=first_id + len(items), task=task, video=name, realtime=float(second),
                          question=qa.question, options=options, gt=right))

    second, seen = asked[int(rng.integers(len(asked)))]
    choice("ASI", second, ASK["first"](seen, rng))
    for second, seen in asked:
        choice("OJR", second, ASK["last"](seen, rng))
        choice("STU", second, where_of(seen.events[-1]))
        choice("EPM", second, ASK[earlier(seen, rng)](seen, rng))
    colour = str(rng.choice([e.colour for e in video.events]))
    counts = [dict(realtime=float(second), count=sum(e.colour == colour for e in seen.events)) for second, seen in asked]
    items.append(dict(id=first_id + len(items), task="REC", video=name, activity=count_activity(colour),
                      test_info=counts))
    return items


STREAMINGBENCH_TASKS = {"first": "Event Understanding", "last": "Object Recognition", "where": "Spatial Understanding",
                        "count": "Counting", "together": "Attribute Perception", "duration": "Action Perception"}


def streamingbench_entry(video: SyntheticVideo, name: str, rng: np.random.Generator) -> dict:
    questions = []
    for second, seen in moments(video):
        for family in ("last", str(rng.choice(["first", "count", earlier(seen, rng)]))):
            qa = ASK[family](seen, rng)
            options, right = multiple_choice(qa, rng)
            questions.append(dict(task_type=STREAMINGBENCH_TASKS[family], question=qa.question,
                                  time_stamp=f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}",
                                  options=lettered(options),
                                  answer=chr(65 + right)))
    return dict(video_path=f"./videos/{name}", questions=questions)


def write_sets(out: Path, videos: int, frames: int, first_seed: int = FIRST_SEED, log=print) -> dict[str, Path]:
    """Write `videos` videos of `frames` frames and both question files into `out`; returns the files."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    ovo, streaming = [], []
    for number in range(videos):
        video = make_video(first_seed + number, frames)
        name = f"builtin_{video.seed}.mp4"
        pixels = video.frames()
        write_video(out / "videos" / name, frames, fps=FPS, size=(FRAME, FRAME), content=pixels.__getitem__)
        rng = np.random.default_rng([video.seed, 3])
        ovo += ovobench_items(video, name, len(ovo), rng)
        entry = streamingbench_entry(video, name, rng)
        streaming += [entry] if entry["questions"] else []
        log(f"video {number + 1}/{videos}: {name}")
    files = dict(ovobench=out / "ovo_bench_new.json", streamingbench=out / "questions_real.json")
    files["ovobench"].write_text(json.dumps(ovo, indent=1) + "\n")
    files["streamingbench"].write_text(json.dumps(streaming, indent=1) + "\n")
    return files
