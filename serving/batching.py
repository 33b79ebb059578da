"""Dynamic batching: requests for one model version that arrive close together run as one
ONNX Runtime call.

Each model version has a Batcher with one worker thread. A request is submitted as one job
(some rows, and the client's deadline); the worker takes the oldest job, waits at most `max_delay_s` for more, gathers
jobs until `max_batch_rows` rows, and hands them to the model's runner, which pads them by
length (similar lengths together) and returns each job its own rows. The queue is bounded
in rows: beyond `max_queue_rows` a request is refused with RESOURCE_EXHAUSTED instead of
waiting without end, and a job whose deadline passed while it waited is dropped unrun
(DEADLINE_EXCEEDED). Results equal unbatched ones: the graphs are padding-invariant.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from serving.errors import DeadlineExceeded, ResourceExhausted


@dataclass
class Job:
    payload: object
    rows: int
    # Jobs with different keys never share a call (e.g. tensors of different shapes).
    key: Hashable = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    # time.monotonic() after which nobody waits for the result any more (None: no deadline).
    deadline: float | None = None


@dataclass
class BatchStats:
    calls: int = 0
    jobs: int = 0
    rows: int = 0
    # Jobs dropped because their deadline passed before they ran.
    expired: int = 0


class Batcher:
    def __init__(
        self, name: str, runner: Callable[[list[object]], list[object]], max_batch_rows: int = 64,
        max_delay_s: float = 0.002, max_queue_rows: int = 4096,
        observe: Callable[[list[float], float, int], None] | None = None,
    ):
        self.name = name
        self.runner = runner
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.stats = BatchStats()
        # Called after every batched call with (each job's queue wait, compute seconds, rows).
        self.observe = observe
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_rows = 0
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, payload: object, rows: int, key: Hashable = None, deadline: float | None = None) -> Future:
        job = Job(payload, rows, key, deadline=deadline)
        with self._condition:
            if self._closed:
                raise ResourceExhausted(f"model {self.name!r} is shutting down")
            if self._queued_rows + rows > self.max_queue_rows:
                raise ResourceExhausted(
                    f"model {self.name!r}: queue full ({self._queued_rows} rows waiting, limit {self.max_queue_rows})"
                )
            self._queue.append(job)
            self._queued_rows += rows
            self._condition.notify()
        return job.future

    def run(self, payload: object, rows: int, key: Hashable = None, deadline: float | None = None) -> object:
        """Submit and wait for this job's result (raises what the runner raised)."""
        return self.submit(payload, rows, key, deadline).result()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=5)

    def _take(self) -> list[Job] | None:
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_delay_s
            while self._queued_rows < self.max_batch_rows and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            first = self._queue[0]
            jobs, rows = [], 0
            for job in list(self._queue):
                if job.key != first.key:
                    continue
                if jobs and rows + job.rows > self.max_batch_rows:
                    break
                jobs.append(job)
                rows += job.rows
            for job in jobs:
                self._queue.remove(job)
            self._queued_rows -= rows
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            now = time.monotonic()
            live = []
            for job in jobs:
                if not job.future.set_running_or_notify_cancel():
                    continue
                if job.deadline is not None and now > job.deadline:
                    self.stats.expired += 1
                    job.future.set_exception(DeadlineExceeded(
                        f"model {self.name!r}: the deadline passed while the request waited; it was not run"
                    ))
                    continue
                live.append(job)
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = self.runner([job.payload for job in live])
            except BaseException as error:  # every waiting request gets the error
                for job in live:
                    job.future.set_exception(error)
                continue
            self.stats.calls += 1
            self.stats.jobs += len(live)
            self.stats.rows += sum(job.rows for job in live)
            if self.observe is not None:
                self.observe([started - job.submitted for job in live], time.perf_counter() - started,
                             sum(job.rows for job in live))
            for job, result in zip(live, results, strict=True):
                job.future.set_result(result)
