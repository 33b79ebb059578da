"""Server settings: one class, read from RNNSERVE_* environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Upper bounds of --instances and --workers: beyond them a typo, not a plan.
MAX_INSTANCES = 64
MAX_WORKERS = 64


class ModelSettings(BaseModel):
    """Per-model overrides of the server's execution settings (a `[model_settings.<name>]` table
    of the config file); unset fields keep the server's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instances: int | None = Field(None, ge=1, le=MAX_INSTANCES, description="ONNX Runtime sessions of this model.")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per session of this model.")


class ServerSettings(BaseSettings):
    """Every server knob; built once at start and passed to constructors."""

    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", frozen=True)

    models: Path = Field(Path("models"), description="Model repository folder, read once at start.")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 to accept remote clients.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    grpc_front: Literal["grpcio", "native", "auto"] = Field(
        "grpcio", description="gRPC server: grpcio, native (pygrpc-native, rnnserve[native]: HTTP/2 in Rust outside "
        "the GIL; plaintext without ping limits only, else refused) or auto (native when installed and the settings "
        "are ones it can serve, else grpcio, and the log says why).",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Execution provider: auto takes CUDA when available, else CPU.",
    )
    instances: int = Field(
        0, ge=0, le=MAX_INSTANCES, description="ONNX Runtime sessions per model version, run concurrently (Triton's "
        "instance group); 0: on CPU one per core of a worker with one thread each (at most 8), on a GPU one.",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per session; 0: on CPU the worker's cores divided among its "
        "instances (1 with the default instances), on a GPU ONNX Runtime's default.",
    )
    workers: int = Field(
        1, ge=1, le=MAX_WORKERS, description="Server processes sharing the port (SO_REUSEPORT), each with its own "
        "event loop, batchers and instances; a connection stays with one worker, so they pay when many client "
        "connections keep one process CPU-bound (about one core of Python work) below the cores there are.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level for every session: disable, basic, extended or all."
    )
    intra_op_spinning: bool = Field(
        False, description="Let ONNX Runtime's threads spin-wait for work between calls: a little lower latency "
        "back to back on an idle machine, but they burn CPU the request path needs.",
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest gRPC message accepted.")
    grace_period_s: float = Field(10.0, ge=0, description="On SIGTERM, time in-flight work gets to finish.")
    worker_threads: int = Field(
        64, gt=0, description="Threads that decode and preprocess requests (they mostly wait on batches)."
    )
    batch_max_rows: int = Field(64, gt=0, description="Dynamic batching: most rows in one ONNX Runtime call.")
    batch_max_delay_ms: float = Field(
        2.0, ge=0, description="Dynamic batching: longest a request waits for others to join its batch (only while "
        "no instance of its model is busy and fewer than batch_preferred_rows rows wait)."
    )
    batch_preferred_rows: int = Field(
        0, ge=0, description="Dynamic batching: an idle instance runs at once when this many rows wait, or when "
        "another instance is busy; with fewer it waits up to batch_max_delay_ms (0: batch_max_rows)."
    )
    model_settings: dict[str, ModelSettings] = Field(
        default_factory=dict, description="Per-model instances and intra_op_threads (config file tables "
        "[model_settings.NAME]; env RNNSERVE_MODEL_SETTINGS as JSON).",
    )
    auth_token: str | None = Field(
        None, description="Require 'authorization: Bearer <token>' on every RPC except health (none: open)."
    )
    auth_token_file: Path | None = Field(
        None, description="Read the bearer token from this file instead (keeps it out of the process list)."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS instead of plaintext.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mutual TLS)."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port (none: off; 0 picks one)."
    )
    queue_max_rows: int = Field(
        4096, gt=0, description="Rows allowed to wait per model; beyond it requests get RESOURCE_EXHAUSTED."
    )

    max_streams: int = Field(
        1024, gt=0, description="Streams and KServe sequences holding state at once; beyond: RESOURCE_EXHAUSTED."
    )
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, description="A stream or sequence without a chunk for this long is ended and its state freed."
    )
    stream_instances: int = Field(
        1, ge=0, le=MAX_INSTANCES, description="ONNX Runtime sessions for each model's stream step graph; 0: as "
        "many as --instances. One by default: a step's audio front end and detector hold the interpreter lock, so "
        "a second step instance mostly slows the event loop (measured: 50 keyword streams p99 39 ms with 1, "
        "129 ms with 2, on 2 cores).",
    )
    stream_batch_max_rows: int = Field(
        256, gt=0, description="Cellular batching: most stream steps in one ONNX Runtime call (1: one per call)."
    )
    keepalive_time_s: float = Field(
        60.0, gt=0, description="Ping a connection with calls in flight after this long without data, to find "
        "dead clients (their streams are then freed)."
    )
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="Close a connection whose keepalive ping gets no answer within this long."
    )
    keepalive_min_ping_interval_s: float = Field(
        10.0, ge=0, description="Clients may ping at most this often; pings without calls in flight are refused "
        "outright. Each ping too soon is a strike."
    )
    keepalive_max_ping_strikes: int = Field(
        2, ge=0, description="Strikes before a client pinging too often is disconnected (GOAWAY too_many_pings; "
        "0: no limit)."
    )

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the gRPC server: message sizes and keepalive enforcement."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Dead clients: ping when a connection with calls in flight has been quiet this long.
            ("grpc.keepalive_time_ms", round(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.keepalive_timeout_s * 1000)),
            # Abusive clients: no pings without calls, none more often than the interval, and
            # GOAWAY (ENHANCE_YOUR_CALM, "too_many_pings") after the strikes.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", round(self.keepalive_min_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", self.keepalive_max_ping_strikes),
            # gRPC shares ports by default on Linux: a second server on a busy port would
            # silently split the traffic instead of failing. Workers share it on purpose (the
            # parent checked that the port was free before starting them).
            ("grpc.so_reuseport", 1 if self.workers > 1 else 0),
        ]

    def stream_limits(self):
        from serving.streaming import StreamLimits

        return StreamLimits(self.max_streams, self.stream_idle_timeout_s, self.stream_batch_max_rows)

    def runtime_options(self):
        """Providers (after probing the device), session options and instances for every model."""
        from serving.runtime import resolve_providers

        return self._runtime(resolve_providers(self.device), self.instances, self.intra_op_threads)

    def model_runtime_options(self, runtime) -> dict:
        """RuntimeOptions of the models with their own settings (on runtime's providers)."""
        return {
            name: self._runtime(runtime.providers, chosen.instances or self.instances,
                                chosen.intra_op_threads or self.intra_op_threads)
            for name, chosen in self.model_settings.items()
        }

    def _runtime(self, providers: tuple, instances: int, intra_op_threads: int):
        from serving.runtime import RuntimeOptions, available_cores, instance_defaults

        runtime = RuntimeOptions(providers, intra_op_threads, self.graph_optimization, self.intra_op_spinning)
        # Each worker process gets its share of the cores.
        cores = max(1, available_cores() // self.workers)
        # Step graphs keep one thread unless threads were chosen (the defaults fill the cores).
        step_threads = intra_op_threads or 1
        instances, intra_op_threads = instance_defaults(cores, runtime.on_gpu, instances, intra_op_threads)
        return RuntimeOptions(providers, intra_op_threads, self.graph_optimization, self.intra_op_spinning, instances,
                              step_threads, self.stream_instances)

    def bearer_token(self) -> str | None:
        """The token clients must send, from auth_token or auth_token_file; None when open."""
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text().strip()
            if not token:
                raise ValueError(f"{self.auth_token_file}: empty token file")
            return token
        return self.auth_token or None

    def server_credentials(self):
        """grpc.ServerCredentials for TLS / mutual TLS, or None for plaintext."""
        if self.tls_cert_file is None and self.tls_key_file is None:
            if self.tls_client_ca_file is not None:
                raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
            return None
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        import grpc

        client_ca = self.tls_client_ca_file.read_bytes() if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None,
        )
