"""`--workers N`: N server processes share one port (SO_REUSEPORT), as in grpc's
examples/python/multiprocessing.

The parent creates no gRPC object at all. It checks that the port is free (port 0: it picks
one), keeps a SO_REUSEPORT socket bound to it until every worker has bound, and starts the
workers with multiprocessing's spawn method, so each starts from a clean interpreter and builds
its own event loop, server, batchers and instances. The kernel spreads incoming connections over
the workers; a connection, with every call and KServe sequence on it, stays with one worker.

The parent forwards SIGTERM/SIGINT to every worker (each drains as a single server does: health
NOT_SERVING, in-flight work finishes within the grace period) and exits 0 when all of them exit
0. A worker that fails to start, or dies while serving, stops the others and the parent exits
non-zero (the orchestrator restarts the whole group). Metrics: every worker writes its values to
files in a temporary folder (prometheus-client's multiprocess mode) and the parent serves their
aggregate on --metrics-port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from serving.settings import ServerSettings

log = logging.getLogger(__name__)

# How long a stopping worker gets beyond the grace period before it is killed.
STOP_MARGIN_S = 30.0


class WorkerFailed(Exception):
    """A worker could not start; the message is its error."""


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A SO_REUSEPORT socket bound to host:port (port 0: a free port), after checking that no
    other socket holds the port (workers would otherwise share it silently with a stranger)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR only overlooks connections in TIME_WAIT; a listening socket still fails the bind.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    except OSError as error:
        raise OSError(f"cannot bind {host}:{port}: {error.strerror or error}") from None
    finally:
        probe.close()
    keeper = socket.socket(family, socket.SOCK_STREAM)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        keeper.bind((host, port))
    except OSError as error:
        keeper.close()
        raise OSError(f"cannot bind {host}:{port}: {error.strerror or error}") from None
    return keeper, port


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGTERM when the parent dies, so no orphan keeps the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(settings: ServerSettings, index: int, parent_pid: int, report: Connection,
            configure_logging: Callable[[], None]) -> None:
    """A worker process: one whole server on the shared port; tells the parent when it serves."""
    # Until the server's own handlers are installed a signal just ends the worker: nothing runs yet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    _die_with_parent()
    if os.getppid() != parent_pid:
        sys.exit(0)
    configure_logging()
    from serving.errors import ModelLoadError
    from serving.grpc.server import serve

    def ready(models: list[str], port: int) -> None:
        log.info("worker %d (pid %d) ready", index, os.getpid())
        report.send(("ready", models))

    try:
        code = serve(settings, on_ready=ready)
    except (ModelLoadError, OSError, ValueError) as error:
        report.send(("failed", str(error)))
        sys.exit(2)
    sys.exit(code)


def serve_workers(settings: ServerSettings, configure_logging: Callable[[], None]) -> int:
    """Run settings.workers server processes on one port until SIGTERM/SIGINT; 0 when every
    worker drained and exited 0."""
    keeper, port = reserve_port(settings.host, settings.port)
    metrics_dir = Path(tempfile.mkdtemp(prefix="rnnserve-metrics-"))
    # prometheus-client picks multiprocess mode from the environment when it is first imported:
    # the workers, spawned below, inherit it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    worker_settings = settings.model_copy(update={"port": port, "metrics_port": None})
    context = multiprocessing.get_context("spawn")
    workers: list[multiprocessing.Process] = []
    reports: dict[Connection, multiprocessing.Process] = {}
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    http = None
    try:
        for index in range(1, settings.workers + 1):
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(
                target=_worker, name=f"worker-{index}",
                args=(worker_settings, index, os.getpid(), send, configure_logging),
            )
            worker.start()
            send.close()
            workers.append(worker)
            reports[receive] = worker
        ready_models = _wait_until_ready(reports, lambda: stopping)
        keeper.close()
        if stopping:
            return _wait_for_exit(workers, settings.grace_period_s)
        if settings.metrics_port is not None:
            from serving.metrics import serve_aggregated_http

            try:
                http = serve_aggregated_http(settings.host, settings.metrics_port, metrics_dir)
            except OSError as error:
                stop()
                _wait_for_exit(workers, settings.grace_period_s)
                raise OSError(f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {error}") from None
            log.info("Prometheus metrics on http://%s:%d/metrics (sum of the workers)", settings.host,
                     http.server_port)
        log.info("serving %s on %s:%d (%d workers, pids %s)", ", ".join(ready_models) or "no ready model",
                 settings.host, port, len(workers), ", ".join(str(worker.pid) for worker in workers))
        died = _watch(workers, lambda: stopping, metrics_dir)
        if died is not None:
            log.error("worker %s (pid %d) exited with %s while serving; stopping the others",
                      died.name, died.pid, died.exitcode)
            stop()
            _wait_for_exit(workers, settings.grace_period_s)
            return 1
        log.info("shutting down: %d workers finishing in-flight work (grace %.1f s)", len(workers),
                 settings.grace_period_s)
        return _wait_for_exit(workers, settings.grace_period_s)
    except WorkerFailed:
        stop()
        _wait_for_exit(workers, settings.grace_period_s)
        raise
    finally:
        keeper.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if http is not None:
            http.shutdown()
            http.server_close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait_until_ready(reports: dict[Connection, multiprocessing.Process], stopping: Callable[[], bool]) -> list[str]:
    """Every worker's ready models once all serve; WorkerFailed with the first failure."""
    waiting = dict(reports)
    models: list[str] = []
    while waiting and not stopping():
        for connection in wait(list(waiting), timeout=0.5):
            worker = waiting.pop(connection)
            try:
                kind, detail = connection.recv()
            except EOFError:  # it died before saying anything
                worker.join(5)
                raise WorkerFailed(f"worker {worker.name} exited with {worker.exitcode} while starting") from None
            if kind == "failed":
                raise WorkerFailed(detail)
            models = detail
    return models


def _watch(workers: list[multiprocessing.Process], stopping: Callable[[], bool],
           metrics_dir: Path) -> multiprocessing.Process | None:
    """Block until stopping (None) or a worker exits on its own (that worker)."""
    from serving.metrics import forget_process

    while not stopping():
        for sentinel in wait([worker.sentinel for worker in workers], timeout=0.5):
            worker = next(worker for worker in workers if worker.sentinel == sentinel)
            worker.join()
            forget_process(worker.pid, metrics_dir)
            if not stopping():
                return worker
    return None


def _wait_for_exit(workers: list[multiprocessing.Process], grace_s: float) -> int:
    """0 when every worker exits 0 in time; stragglers are killed (then 1)."""
    deadline = time.monotonic() + grace_s + STOP_MARGIN_S
    for worker in workers:
        if worker.pid is None:
            continue
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.exitcode is None:
            log.error("worker %s (pid %d) did not stop in time; killing it", worker.name, worker.pid)
            worker.kill()
            worker.join()
    codes = [worker.exitcode for worker in workers if worker.pid is not None]
    if any(code != 0 for code in codes):
        log.error("worker exit codes: %s", codes)
        return 1
    return 0
