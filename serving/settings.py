"""Server settings: one class, read from RNNSERVE_* environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Every server knob; built once at start and passed to constructors."""

    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", frozen=True)

    models: Path = Field(Path("models"), description="Model repository folder, read once at start.")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 to accept remote clients.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Execution provider: auto takes CUDA when available, else CPU.",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session (0: runtime default).")
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
        2.0, ge=0, description="Dynamic batching: longest a request waits for others to join its batch."
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
            # silently split the traffic instead of failing.
            ("grpc.so_reuseport", 0),
        ]

    def stream_limits(self):
        from serving.streaming import StreamLimits

        return StreamLimits(self.max_streams, self.stream_idle_timeout_s, self.stream_batch_max_rows)

    def runtime_options(self):
        """Providers (after probing the device) and session options for every model."""
        from serving.runtime import RuntimeOptions, resolve_providers

        return RuntimeOptions(resolve_providers(self.device), self.intra_op_threads, self.graph_optimization,
                              self.intra_op_spinning)

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
