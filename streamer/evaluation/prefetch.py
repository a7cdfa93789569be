"""Video decoding off the model's thread: a reader thread loads the next videos while the model works."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

_DONE = object()


@dataclass
class Prefetched:
    item: Any
    value: Any  # what load(item) returned; None when it failed
    error: Exception | None  # why load(item) failed
    seconds: float  # spent in load(item), on the reader thread


def prefetch(items: Iterable, load: Callable[[Any], Any], depth: int = 1) -> Iterator[Prefetched]:
    """load(item) for each item on a background thread, yielded in order, at most `depth` waiting.

    A failing load is handed back with its item (`error` set) and the next item is loaded: one
    unreadable video does not stop an evaluation. Leaving the loop early stops the thread after
    the item it is loading. Memory is bounded by depth + 2 loaded items (waiting, being loaded,
    in use by the caller).
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():  # a timeout, so that a consumer gone away never leaves the thread blocked
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def reader() -> None:
        try:
            for item in items:
                start = time.perf_counter()
                try:
                    value, error = load(item), None
                except Exception as exc:  # decoders fail in many ways; each is this item's error
                    value, error = None, exc
                if not put(Prefetched(item, value, error, time.perf_counter() - start)):
                    return
        finally:
            put(_DONE)

    thread = threading.Thread(target=reader, name="video-prefetch", daemon=True)
    thread.start()
    try:
        while (entry := results.get()) is not _DONE:
            yield entry
    finally:
        stop.set()
