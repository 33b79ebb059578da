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
# Metrics folders are named after the parent's pid, so a later group can remove an orphan's.
METRICS_PREFIX = "rnnserve-metrics-"


class WorkerFailed(Exception):
    """A worker could not start; the message is its error."""


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of every address gRPC binds for host (both loopbacks for localhost)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(f"cannot bind {host}:{port}: {error.strerror or error}") from None
    unique: dict[tuple, tuple[int, tuple]] = {}
    for family, _, _, _, address in found:
        if family in (socket.AF_INET, socket.AF_INET6):
            unique.setdefault((family, address[0]), (family, address))
    if not unique:
        raise OSError(f"cannot bind {host}:{port}: no IPv4 or IPv6 address")
    return list(unique.values())


def _bind_all(addresses: list[tuple[int, tuple]], port: int, reuse_port: bool) -> list[socket.socket]:
    """Sockets bound to port on every address (port 0: the first picks, the others follow)."""
    bound: list[socket.socket] = []
    both_families = len({family for family, _ in addresses}) > 1
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            bound.append(sock)
            if family == socket.AF_INET6 and both_families:  # e.g. localhost: ::1 beside 127.0.0.1
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # SO_REUSEADDR only overlooks connections in TIME_WAIT; a listening socket still fails the bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT if reuse_port else socket.SO_REUSEADDR, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """SO_REUSEPORT sockets bound to host:port on every address host names (port 0: a port free
    on all of them), after checking that no other socket holds it there (workers would otherwise
    share it silently with a stranger)."""
    addresses = _addresses(host, port)
    error: OSError | None = None
    for _ in range(20 if port == 0 else 1):  # port 0: the port the first address picked may be taken on another
        try:
            probes = _bind_all(addresses, port, reuse_port=False)
        except OSError as failed:
            error = failed
            continue
        chosen = probes[0].getsockname()[1]
        for probe in probes:
            probe.close()
        try:
            return _bind_all(addresses, chosen, reuse_port=True), chosen
        except OSError as failed:
            error = failed
    raise OSError(f"cannot bind {host}:{port}: {error.strerror or error}") from None


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
    # Until the server's own handlers are installed a signal just ends the worker: nothing serves
    # yet. os._exit, not sys.exit: a SystemExit raised while a C extension initialises (numpy,
    # onnxruntime) surfaces as "ImportError: initialization failed" and a traceback, exit 1.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
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
    keepers, port = reserve_port(settings.host, settings.port)
    _remove_orphaned_metrics()
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-"))
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
    log.info("starting %d workers on %s:%d", settings.workers, settings.host, port)
    http = None
    try:
        for index in range(1, settings.workers + 1):
            if stopping:
                break
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(
                target=_worker, name=f"worker-{index}",
                args=(worker_settings, index, os.getpid(), send, configure_logging),
            )
            worker.start()
            send.close()
            workers.append(worker)
            reports[receive] = worker
        if stopping:  # a signal that came while a worker was being started did not reach that one
            stop()
        ready_models = _wait_until_ready(reports, lambda: stopping)
        _close(keepers)
        if stopping:  # signalled while the workers started: those not yet serving just end
            return _wait_for_exit(workers, settings.grace_period_s, starting=True)
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
        _close(keepers)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if http is not None:
            http.shutdown()
            http.server_close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _remove_orphaned_metrics() -> None:
    """Metrics folders of worker groups whose parent died without cleaning up (e.g. SIGKILL)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = folder.name[len(METRICS_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
                if stopping():  # it was told to stop: not a failure
                    continue
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


def _wait_for_exit(workers: list[multiprocessing.Process], grace_s: float, starting: bool = False) -> int:
    """0 when every worker exits 0 in time; stragglers are killed (then 1). starting: the group
    was signalled before every worker served, so a worker ended by that SIGTERM before it set
    its own handlers (exit -15) stopped as asked too."""
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
    clean = {0, -signal.SIGTERM} if starting else {0}
    if any(code not in clean for code in codes):
        log.error("worker exit codes: %s", codes)
        return 1
    return 0
