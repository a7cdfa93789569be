"""Two `streamer eval synthetic --json` runs on the same videos (e.g. two models), row by row: each row's
accuracy in both and the paired difference B - A per video, with a 95% bootstrap interval over videos, and
per question family. Rows pair by label and length; the runs must have measured the same seeds.

    streamer eval synthetic --lengths 384 --model builtin --json a.json ...
    streamer eval synthetic --lengths 384 --model my-model --json b.json ...    # the same options
    python tools/paired_synthetic.py a.json b.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamer.builtin.videos import QUESTION_KINDS
from streamer.evaluation.synthetic import bootstrap_interval


def paired_rows(a: dict, b: dict, resamples: int) -> list[str]:
    for key in ("first_seed", "videos"):
        if a["config"].get(key) != b["config"].get(key):
            raise SystemExit(f"error: the runs measured different videos ({key} {a['config'].get(key)} against "
                             f"{b['config'].get(key)}); rerun one with the other's --first-seed and --videos")
    theirs = {(row["frames"], row["label"]): row for row in b["results"]}
    lines = ["| frames | row | A | B | B - A | 95% interval | B - A per family: " + " / ".join(QUESTION_KINDS) + " |",
             "|---:|---|---:|---:|---:|---|---|"]
    for mine in a["results"]:
        other = theirs.get((mine["frames"], mine["label"]))
        if other is None or "correct" not in mine or "correct" not in other:
            continue
        first, second = np.array(mine["correct"], dtype=float), np.array(other["correct"], dtype=float)
        difference = second.mean(axis=1) - first.mean(axis=1)
        low, high = bootstrap_interval(difference, resamples)
        families = " / ".join(f"{100 * d:+.0f}" for d in second.mean(axis=0) - first.mean(axis=0))
        lines.append(f"| {mine['frames']} | {mine['label']} | {mine['accuracy']:.1f} | {other['accuracy']:.1f} | "
                     f"{100 * difference.mean():+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | {families} |")
    if len(lines) == 2:
        raise SystemExit("error: no row of the same label and length has per-video results in both runs (`correct`, "
                         "written since 2026-12-07); rerun them with this version")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("a", help="the first run's --json (A)")
    parser.add_argument("b", help="the second run's --json (B)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples per interval")
    args = parser.parse_args(argv)
    runs = [json.loads(Path(path).read_text()) for path in (args.a, args.b)]
    print("\n".join(paired_rows(*runs, args.bootstrap)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
