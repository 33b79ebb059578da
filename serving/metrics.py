"""Prometheus metrics, served over HTTP on their own port (`--metrics-port`).

Each server owns its registry, so several servers can live in one process (tests do). With
`--workers N` every worker process writes its values to files in a shared folder
(prometheus-client's multiprocess mode) and the parent serves their sum (`serve_aggregated_http`).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The model label of requests naming a model the repository does not have.
UNKNOWN_MODEL = "_unknown_"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rnnserve_requests", "RPCs by method, model and gRPC status code", ["method", "model", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "rnnserve_request_seconds", "RPC wall time, decode to reply", ["method", "model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "rnnserve_queue_seconds", "Time a request waited in its model's batching queue", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "rnnserve_compute_seconds", "Time of one batched ONNX Runtime call", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = Histogram(
            "rnnserve_batch_rows", "Rows per batched ONNX Runtime call", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        # Gauges are summed over live worker processes (or, for readiness, the most of them).
        self.active_streams = Gauge(
            "rnnserve_active_streams", "Streams and sequences holding state, by model", ["model"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.instances = Gauge(
            "rnnserve_instances", "ONNX Runtime sessions (instances) per model (stream steps under <model>/step)",
            ["model"], registry=self.registry, multiprocess_mode="livesum",
        )
        self.instances_busy = Gauge(
            "rnnserve_instances_busy", "Instances running an ONNX Runtime call right now, per model", ["model"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.streams_closed = Counter(
            "rnnserve_streams_closed", "Streams and sequences whose state was freed, by model and reason "
            "(end, cancelled, idle, deadline, error, shutdown)", ["model", "reason"], registry=self.registry,
        )
        self.model_ready = Gauge(
            "rnnserve_model_ready", "1 when the model has a loaded version, 0 when it failed to load",
            ["model"], registry=self.registry, multiprocess_mode="livemax",
        )
        # Names a client may put in a label: the repository's. Anything else counts as UNKNOWN_MODEL,
        # so made-up names cannot grow the number of series.
        self.model_names: frozenset[str] = frozenset()
        self._http = None

    def set_models(self, ready: dict[str, bool]) -> None:
        """The repository's models and whether each loaded (at start)."""
        self.model_names = frozenset(ready)
        for name, loaded in ready.items():
            self.model_ready.labels(name).set(1 if loaded else 0)

    def model_label(self, name: str) -> str:
        return name if name in self.model_names else UNKNOWN_MODEL

    def count_request(self, method: str, model: str, code: str, seconds: float | None = None) -> None:
        label = self.model_label(model)
        self.requests.labels(method, label, code).inc()
        if seconds is not None:
            self.request_seconds.labels(method, label).observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_aggregated_http(host: str, port: int, directory: Path):
    """/metrics summed over the worker processes writing to `directory`; returns the HTTP server
    (its `server_port` is the bound port)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    http, _ = start_http_server(port, addr=host, registry=registry)
    return http


def forget_process(pid: int, directory: Path) -> None:
    """A worker exited: its live gauges stop counting (its counters keep their totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))
