"""The gRPC front (`--grpc-front grpcio|native|auto`): which server speaks HTTP/2 and gRPC.

grpcio's `grpc.aio` server can do everything we configure. pygrpc-native (`rnnserve[native]`)
does the HTTP/2 and gRPC framing in Rust outside the GIL and runs the same servicers,
interceptors and generated code; it serves unary and server-streaming methods itself and hands
the rest (the bidirectional Stream and ModelStreamInfer, server reflection) to a grpcio server
on a Unix socket behind it. It has no TLS and accepts client pings without policing them, so a
configuration that needs either is not one it can serve: `auto` then takes grpcio and says why,
and an explicit `native` is refused with the flag to change.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import grpc

from serving.settings import ServerSettings

log = logging.getLogger(__name__)

NATIVE_PACKAGE = "pygrpc_native"


class FrontUnavailable(ValueError):
    """`--grpc-front native` was asked for a configuration it cannot serve; the message names the flags."""


@dataclass(frozen=True)
class Front:
    """The chosen front and, for the log, why it was chosen."""

    name: str  # "grpcio" or "native"
    reason: str


def native_installed() -> bool:
    return importlib.util.find_spec(NATIVE_PACKAGE) is not None


def native_obstacles(settings: ServerSettings) -> list[str]:
    """What in these settings the native front cannot serve (empty: it can serve them all)."""
    obstacles = []
    if settings.tls_client_ca_file is not None:
        obstacles.append("mutual TLS (--tls-client-ca-file; it serves plaintext only)")
    elif settings.tls_cert_file is not None or settings.tls_key_file is not None:
        obstacles.append("TLS (--tls-cert-file, --tls-key-file; it serves plaintext only)")
    if settings.keepalive_max_ping_strikes > 0:
        obstacles.append(
            f"--keepalive-max-ping-strikes {settings.keepalive_max_ping_strikes} (it takes client pings without "
            "limits, so a client flooding pings is never sent away; 0 turns the limit off)"
        )
    return obstacles


def choose_front(settings: ServerSettings) -> Front:
    """The front for these settings; FrontUnavailable when `native` was asked for and cannot serve."""
    if settings.grpc_front == "grpcio":
        return Front("grpcio", "--grpc-front grpcio")
    installed = native_installed()
    obstacles = native_obstacles(settings)
    if settings.grpc_front == "native":
        if not installed:
            raise FrontUnavailable(
                "--grpc-front native: pygrpc-native is not installed (pip install 'rnnserve[native]'), "
                "or use --grpc-front grpcio or auto"
            )
        if obstacles:
            raise FrontUnavailable(
                f"--grpc-front native: pygrpc-native cannot serve {'; '.join(obstacles)}. Change that, or use "
                "--grpc-front auto (grpcio serves such settings) or grpcio"
            )
        return Front("native", "--grpc-front native")
    if not installed:
        return Front("grpcio", "auto: pygrpc-native is not installed (rnnserve[native])")
    if obstacles:
        return Front("grpcio", f"auto: pygrpc-native cannot serve {'; '.join(obstacles)}")
    return Front("native", "auto: pygrpc-native is installed and the settings are plaintext without ping limits")


def new_server(front: Front, interceptors: list, options: list[tuple[str, int]]) -> grpc.aio.Server:
    """An unstarted grpc.aio-compatible server on the chosen front."""
    if front.name == "native":
        import pygrpc_native
        import pygrpc_native.aio

        log.info("gRPC front: native, pygrpc-native %s (%s); bidirectional streams and reflection go through "
                 "its grpcio server behind it", pygrpc_native.__version__, front.reason)
        return pygrpc_native.aio.server(interceptors=interceptors, options=options)
    log.info("gRPC front: grpcio %s (%s)", grpc.__version__, front.reason)
    return grpc.aio.server(interceptors=interceptors, options=options)
