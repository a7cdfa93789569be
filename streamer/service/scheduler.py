"""One model, many sessions: model work runs one job at a time on a worker thread.

Jobs wait in a priority queue, so a question overtakes chunks of video that are still
queued: a live answer is never stuck behind minutes of ingestion. Within a priority, jobs
run in submission order (a session's chunks stay in stream order). The event loop never
runs model code, so sockets stay responsive while the model works.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

ASK = 0  # questions first
INGEST = 1


class ModelScheduler:
    def __init__(self):
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.order = itertools.count()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start on the running event loop; once (later calls do nothing)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, priority: int, fn: Callable[..., Any], *args) -> Any:
        """Run fn(*args) on the model thread when its turn comes; cancelling the await drops the job."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((priority, next(self.order), fn, args, future))
        return await future

    def pending(self) -> int:
        return self.queue.qsize()

    async def _run(self) -> None:
        while True:
            await self._execute(*await self.queue.get())  # no job's arguments outlive it in this frame

    async def _execute(self, _priority, _order, fn, args, future) -> None:
        if future.done():  # cancelled while queued: its session is gone
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except Exception as exc:  # reported to the session that submitted the job
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
