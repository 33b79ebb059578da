"""Dynamic batching in Triton's terms: a queue, a scheduler that forms batches, instances that
run them.

Each model version (and each step graph) has a Batcher. A request is submitted as one job (some
rows, and the client's deadline) to its bounded `JobQueue`: beyond `max_queue_rows` rows it is
refused with RESOURCE_EXHAUSTED instead of waiting without end. Every model instance (one ONNX
Runtime session each) is a thread that asks the `Scheduler` for its next batch; ONNX Runtime
releases the interpreter lock while it runs, so instances compute at the same time, and the next
batch forms in the queue while they do (pipelining). The scheduler's rule for an idle instance:

- take what is queued at once (oldest first, jobs of the oldest job's key, up to
  `max_batch_rows`) when another instance is busy, or when at least `preferred_rows` rows wait;
  when other instances are idle too, take only this instance's share of the queued rows (the
  rows divided by the idle instances, rounded up) and leave the rest to them, so that the
  queued work runs side by side rather than on one instance while the others wait;
- otherwise hold until either becomes true or the oldest job has waited `max_delay_s`, but never
  so long that a queued job's deadline would pass before a call as long as the last one ends
  (with `HOLD_DEADLINE_MARGIN_S` to spare).

A job whose deadline passed while it waited is dropped unrun (DEADLINE_EXCEEDED). Results equal
unbatched ones: the graphs are padding-invariant, and each job gets its own rows back.

Callers on an event loop (`submit_async`) get an asyncio future, and an instance resolves all of
a batch's futures of one loop with a single cross-thread wake-up of that loop, not one per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from serving.errors import DeadlineExceeded, ResourceExhausted

log = logging.getLogger(__name__)

# A hold ends this long (beyond the last call's duration) before the nearest queued deadline:
# room for the answer to travel back.
HOLD_DEADLINE_MARGIN_S = 0.02


@dataclass
class Job:
    payload: object
    rows: int
    # Jobs with different keys never share a call (e.g. tensors of different shapes).
    key: Hashable = None
    # Where the result goes: a thread's Future, or an asyncio future of an event loop.
    future: Future | None = None
    waiter: asyncio.Future | None = None
    # Turns the runner's result for this job into the caller's (on the instance thread).
    then: Callable[[object], object] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    # time.monotonic() after which nobody waits for the result any more (None: no deadline).
    deadline: float | None = None

    @property
    def done(self) -> bool:
        """Its caller already has an answer (read across threads: a flag)."""
        return self.waiter.done() if self.waiter is not None else self.future.done()

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (cancelled call). A thread's Future is marked running here."""
        if self.waiter is not None:
            return self.waiter.cancelled()  # a flag read across threads: at worst a late cancel runs
        return not self.future.set_running_or_notify_cancel()


def _resolve(outcomes: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    """On the event loop: hand a batch's results to its waiters."""
    for waiter, value, error in outcomes:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(value)
        else:
            waiter.set_exception(error)


def deliver(outcomes: list[tuple[Job, object, BaseException | None]]) -> None:
    """Results (or errors) to their callers: Futures at once, asyncio futures with one
    call_soon_threadsafe per event loop for the whole list."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, value, error in outcomes:
        if job.waiter is None:
            if error is None:
                job.future.set_result(value)
            else:
                job.future.set_exception(error)
        else:
            by_loop.setdefault(job.waiter.get_loop(), []).append((job.waiter, value, error))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop has closed: nobody waits for these any more
            pass


@dataclass
class BatchStats:
    calls: int = 0
    jobs: int = 0
    rows: int = 0
    # Jobs dropped because their deadline passed before they ran.
    expired: int = 0
    # Most instances computing at the same moment (2 or more: their calls overlapped).
    max_concurrent: int = 0


class JobQueue:
    """Jobs waiting for an instance, oldest first, bounded in rows. Not locked: the scheduler
    holds its condition around every use."""

    def __init__(self, name: str, max_queue_rows: int):
        self.name = name
        self.max_queue_rows = max_queue_rows
        self.rows = 0
        self._jobs: collections.deque[Job] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def oldest(self) -> Job:
        return self._jobs[0]

    def jobs(self) -> collections.deque[Job]:
        return self._jobs

    def put(self, job: Job) -> None:
        if self.rows + job.rows > self.max_queue_rows:
            raise ResourceExhausted(
                f"model {self.name!r}: queue full ({self.rows} rows waiting, limit {self.max_queue_rows})"
            )
        self._jobs.append(job)
        self.rows += job.rows

    def take(self, max_rows: int) -> list[Job]:
        """The oldest job and the next ones of its key, up to max_rows (the first always)."""
        key = self._jobs[0].key
        jobs, rows, skipped = [], 0, False
        for job in self._jobs:
            if job.key != key:
                skipped = True
                continue
            if jobs and rows + job.rows > max_rows:
                break
            jobs.append(job)
            rows += job.rows
        if not skipped:  # the usual case: the batch is the head of the queue
            for _ in jobs:
                self._jobs.popleft()
        else:
            taken = {id(job) for job in jobs}
            self._jobs = collections.deque(job for job in self._jobs if id(job) not in taken)
        self.rows -= rows
        return jobs


class Scheduler:
    """Forms batches from the queue for idle instances (the rule is in the module docstring)."""

    def __init__(self, queue: JobQueue, max_batch_rows: int, max_delay_s: float, preferred_rows: int,
                 stats: BatchStats, instances: int = 1):
        self.queue = queue
        self.instances = instances
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.preferred_rows = preferred_rows
        self.stats = stats
        self.busy = 0
        self.closed = False
        # Jobs are queued that an instance left to the other idle ones (see _share).
        self.released = False
        # Seconds the last call took: a hold ends that long before the nearest queued deadline.
        self.last_call_s = 0.0
        self._condition = threading.Condition()

    def submit(self, job: Job) -> None:
        with self._condition:
            if self.closed:
                raise ResourceExhausted(f"model {self.queue.name!r} is shutting down")
            self.queue.put(job)
            self._condition.notify()

    def close(self) -> None:
        """No new jobs; instances run what is queued without holding, then stop."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()

    def _hold_s(self) -> float:
        """How much longer an idle instance holds the queued jobs before running them (<= 0: none)."""
        if self.closed or self.busy or self.released or self.queue.rows >= self.preferred_rows:
            return 0.0
        hold_s = self.queue.oldest.submitted + self.max_delay_s - time.perf_counter()
        # Holding only happens below the preferred size, so the queue is short here.
        deadlines = [job.deadline for job in self.queue.jobs() if job.deadline is not None]
        if deadlines and hold_s > 0:
            hold_s = min(hold_s, min(deadlines) - self.last_call_s - HOLD_DEADLINE_MARGIN_S - time.monotonic())
        return hold_s

    def _share(self) -> int:
        """Most rows this idle instance takes: all it may when it is the only idle one, else its
        share of what is queued (measured: with 2 instances x 1 thread and 32 requests in flight,
        taking everything left one instance idle half the time)."""
        idle = self.instances - self.busy
        if idle <= 1:
            return self.max_batch_rows
        return min(self.max_batch_rows, -(-self.queue.rows // idle))

    def next_batch(self) -> list[Job] | None:
        """Block an idle instance until it has a batch to run; None once closed and drained."""
        with self._condition:
            while True:
                if len(self.queue):
                    hold_s = self._hold_s()
                    if hold_s <= 0:
                        share = self._share()
                        jobs = self.queue.take(share)
                        # Rows a split left behind are the other idle instances' share: they run at
                        # once, even below the preferred size.
                        self.released = share < self.max_batch_rows and len(self.queue) > 0
                        self.busy += 1
                        self.stats.max_concurrent = max(self.stats.max_concurrent, self.busy)
                        if len(self.queue):  # another idle instance takes the rest at once
                            self._condition.notify()
                        return jobs
                    self._condition.wait(hold_s)
                elif self.closed:
                    return None
                else:
                    self._condition.wait()

    def finished(self, call_s: float | None = None) -> None:
        """An instance is idle again (after a call of call_s seconds, if it made one)."""
        with self._condition:
            self.busy -= 1
            if call_s is not None:
                self.last_call_s = call_s

    def count(self, jobs: int, rows: int) -> None:
        """A call ran (counted before its results go out, so a client that has its answer sees it)."""
        with self._condition:
            self.stats.calls += 1
            self.stats.jobs += jobs
            self.stats.rows += rows

    def expired(self) -> None:
        with self._condition:
            self.stats.expired += 1


class Batcher:
    """A model version's queue, scheduler and instances.

    `runner` runs a list of job payloads and returns one result per payload; give a sequence of
    runners for several instances (one thread each, e.g. one per ONNX Runtime session)."""

    def __init__(
        self, name: str, runner: Callable[[list[object]], list[object]] | Sequence[Callable],
        max_batch_rows: int = 64, max_delay_s: float = 0.002, max_queue_rows: int = 4096,
        observe: Callable[[list[float], float, int], None] | None = None, preferred_rows: int | None = None,
        track_busy: Callable[[int], None] | None = None,
    ):
        self.name = name
        self.runners = list(runner) if isinstance(runner, Sequence) else [runner]
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.stats = BatchStats()
        self.queue = JobQueue(name, max_queue_rows)
        # A preferred size above the largest batch could never be reached: it would always hold.
        preferred = min(preferred_rows or max_batch_rows, max_batch_rows)
        self.scheduler = Scheduler(self.queue, max_batch_rows, max_delay_s, preferred, self.stats,
                                   len(self.runners))
        # Called after every batched call with (each job's queue wait, compute seconds, rows).
        self.observe = observe
        # Called with +1 when an instance starts a call and -1 when it ends it (a busy gauge).
        self.track_busy = track_busy
        self._threads = [
            threading.Thread(target=self._instance, args=(runner,), name=f"instance-{name}-{index}", daemon=True)
            for index, runner in enumerate(self.runners)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def instances(self) -> int:
        return len(self.runners)

    def submit(self, payload: object, rows: int, key: Hashable = None, deadline: float | None = None,
               then: Callable[[object], object] | None = None) -> Future:
        """Queue a job for a caller on a thread; the Future holds then(result) (or the result)."""
        job = Job(payload, rows, key, future=Future(), then=then, deadline=deadline)
        self.scheduler.submit(job)
        return job.future

    def submit_async(self, payload: object, rows: int, key: Hashable = None, deadline: float | None = None,
                     then: Callable[[object], object] | None = None) -> asyncio.Future:
        """submit() for a caller on the running event loop: an asyncio future of that loop."""
        job = Job(payload, rows, key, waiter=asyncio.get_running_loop().create_future(), then=then,
                  deadline=deadline)
        self.scheduler.submit(job)
        return job.waiter

    def run(self, payload: object, rows: int, key: Hashable = None, deadline: float | None = None) -> object:
        """Submit and wait for this job's result (raises what the runner raised)."""
        return self.submit(payload, rows, key, deadline).result()

    def close(self) -> None:
        self.scheduler.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _instance(self, runner: Callable[[list[object]], list[object]]) -> None:
        while (jobs := self.scheduler.next_batch()) is not None:
            call_s, outcomes, idle = None, [], False
            try:
                live = self._live(jobs)
                if live:
                    started = time.perf_counter()
                    outcomes = self._execute(runner, live)
                    call_s = time.perf_counter() - started
                # Idle before the answers go out: a request sent after an answer came back finds
                # this instance idle (and is held for a batch), not busy (and run at once).
                self.scheduler.finished(call_s)
                idle = True
                deliver(outcomes)
            except Exception as error:  # keep this instance serving; whoever still waits hears why
                log.exception("model %r: an instance failed outside the model call", self.name)
                deliver([(job, None, error) for job in jobs if not job.done])
            finally:
                if not idle:
                    self.scheduler.finished(call_s)

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs someone still waits for; those past their deadline get DEADLINE_EXCEEDED."""
        now = time.monotonic()
        live, expired = [], []
        for job in jobs:
            late = job.deadline is not None and now > job.deadline
            if job.abandoned:  # e.g. gRPC cancelled the call at its deadline: counted, not run
                if late:
                    self.scheduler.expired()
                continue
            if late:
                self.scheduler.expired()
                expired.append((job, None, DeadlineExceeded(
                    f"model {self.name!r}: the deadline passed while the request waited; it was not run"
                )))
                continue
            live.append(job)
        deliver(expired)
        return live

    def _execute(self, runner: Callable[[list[object]], list[object]], live: list[Job]) -> list[tuple]:
        """Run one batch: (job, result, error) for each of its jobs, for the caller to deliver."""
        if self.track_busy is not None:
            self.track_busy(1)
        started = time.perf_counter()
        try:
            results = runner([job.payload for job in live])
            if len(results) != len(live):  # a runner bug must still answer every waiting request
                raise RuntimeError(f"model {self.name!r}: {len(results)} results for {len(live)} jobs")
        except BaseException as error:  # every waiting request gets the error
            return [(job, None, error) for job in live]
        finally:
            if self.track_busy is not None:
                self.track_busy(-1)
        rows = sum(job.rows for job in live)
        try:
            self.scheduler.count(len(live), rows)
            if self.observe is not None:
                self.observe([started - job.submitted for job in live], time.perf_counter() - started, rows)
        except Exception:  # bookkeeping (e.g. a metrics file) must never cost the waiting requests
            log.exception("model %r: recording a batch's metrics failed", self.name)
        outcomes = []
        for job, result in zip(live, results, strict=True):
            if job.then is None:
                outcomes.append((job, result, None))
                continue
            try:
                outcomes.append((job, job.then(result), None))
            except Exception as error:  # this job's own post-processing failed: only it gets the error
                outcomes.append((job, None, error))
        return outcomes
