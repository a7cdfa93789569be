"""An endless stream costs the same at its 600th chunk as at its 300th (issue 33, item 15): once the budget is
full, the memory's tokens, its Python-side records, its snapshot header and the time a chunk takes stay flat, on
each family, its past re-timed again and again (512 positions). Before, every chunk
left a report of about a kilobyte behind for good (~10 MB of RAM and ~3 MB of snapshot header after 27.8 hours)."""

import gc
import json
import statistics
import time
import tracemalloc

import numpy as np
import pytest

from memory.baselines import FullPolicy
from memory.snapshot import stream_fields
from memory.store import coverage

pytestmark = pytest.mark.slow

CHUNKS = 600
BUDGET = 96  # tokens per layer: full after a few dozen chunks of 2 frames


def header_bytes(memory) -> int:
    return len(json.dumps(stream_fields(memory)))


def test_a_long_stream_stays_flat(family_runner):
    runner = family_runner
    memory = runner.new_memory(budget=BUDGET, max_positions=512)
    memory.records = 8  # the newest reports kept whole (1024 by default; few here, so the test is short)
    policy, rng = FullPolicy(), np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 112, 3), dtype=np.uint8) for _ in range(2)]
    seconds, sizes, headers = [], [], {}
    for number in range(1, CHUNKS + 1):
        if number == CHUNKS // 2:
            gc.collect()
            tracemalloc.start()
            headers["half"] = header_bytes(memory)
        started = time.process_time()
        runner.ingest(memory, frames, policy, fps=2.0)
        seconds.append(time.process_time() - started)
        sizes.append(memory.mean_tokens())
    gc.collect()  # garbage in reference cycles (torch's dispatch leaves some) is not kept memory
    grown, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    headers["end"] = header_bytes(memory)

    assert memory.chunk_count == CHUNKS and len(memory.chunks) == 8
    assert max(sizes[CHUNKS // 10:]) <= BUDGET  # the memory itself: within its budget throughout
    # what the last 300 chunks left in Python objects and in the header: the history's four numbers each (~70 B),
    # and ~100 B that torch's own dispatch keeps per forward on some families; a kept report was ~1.2 KB here
    assert grown < 64 * 1024 + 400 * (CHUNKS // 2), grown
    assert headers["end"] - headers["half"] < 40 * (CHUNKS // 2), headers
    assert memory.time_shift > 0  # re-timed
    # medians of 100 chunks, both while tracemalloc runs (it slows Python down)
    late, middle = statistics.median(seconds[-100:]), statistics.median(seconds[CHUNKS // 2:CHUNKS // 2 + 100])
    assert late < 3 * middle, (middle, late)
    # coverage still reads the whole stream: every quarter is reported, the oldest nearly gone
    quarters = [row for row in coverage(memory) if row["stretch"].startswith("quarter")]
    assert len(quarters) == 4 and quarters[0]["held"] < quarters[3]["held"]
