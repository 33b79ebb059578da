"""Choosing the gRPC front (`--grpc-front`): grpcio by default, auto takes pygrpc-native only for
settings it can serve and logs why it did not, an explicit native is refused with the flags to
change, and a bad value is named."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from serving.grpc.client import RnnServeClient
from serving.grpc.front import FrontUnavailable, choose_front, native_installed
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]
needs_native = pytest.mark.skipif(not native_installed(), reason="pygrpc-native is not installed (rnnserve[native])")

# settings the native front cannot serve -> what the log or the refusal names
UNSERVABLE = {
    "tls": ({"tls_cert_file": "server.crt", "tls_key_file": "server.key", "keepalive_max_ping_strikes": 0},
            "TLS (--tls-cert-file, --tls-key-file"),
    "mutual_tls": ({"tls_cert_file": "server.crt", "tls_key_file": "server.key", "tls_client_ca_file": "ca.crt",
                    "keepalive_max_ping_strikes": 0}, "mutual TLS (--tls-client-ca-file"),
    "ping_strikes": ({}, "--keepalive-max-ping-strikes 2"),
}


def test_grpcio_is_the_default_front():
    settings = ServerSettings()
    assert settings.grpc_front == "grpcio" and choose_front(settings).name == "grpcio"


@needs_native
def test_auto_takes_native_for_plaintext_without_ping_limits():
    front = choose_front(ServerSettings(grpc_front="auto", keepalive_max_ping_strikes=0))
    assert front.name == "native" and "plaintext" in front.reason


@needs_native
@pytest.mark.parametrize("case", UNSERVABLE)
def test_auto_falls_back_to_grpcio_and_says_why(case):
    fields, named = UNSERVABLE[case]
    front = choose_front(ServerSettings(grpc_front="auto", **fields))
    assert front.name == "grpcio" and named in front.reason, front.reason


@needs_native
@pytest.mark.parametrize("case", UNSERVABLE)
def test_native_refuses_settings_it_cannot_serve_and_names_them(case):
    fields, named = UNSERVABLE[case]
    with pytest.raises(FrontUnavailable, match="--grpc-front native") as raised:
        choose_front(ServerSettings(grpc_front="native", **fields))
    assert named in str(raised.value) and "--grpc-front auto" in str(raised.value)


@needs_native
def test_auto_serves_on_native_and_the_log_says_so(caplog):
    settings = ServerSettings(models=ROOT / "models", port=0, grpc_front="auto", keepalive_max_ping_strikes=0)
    with caplog.at_level(logging.INFO, logger="serving.grpc.front"), BackgroundServer(settings) as server, \
            RnnServeClient(server.target) as client:
        assert client.classify("sentiment", ["a fine flight"])[0].label
        assert list(client.stream("sentiment", ["a fine ", "flight"]))[-1].final
    assert "gRPC front: native" in caplog.text and "auto:" in caplog.text


def test_auto_with_default_settings_serves_on_grpcio_and_the_log_says_why(caplog):
    settings = ServerSettings(models=ROOT / "models", port=0, grpc_front="auto")
    with caplog.at_level(logging.INFO, logger="serving.grpc.front"), BackgroundServer(settings) as server, \
            RnnServeClient(server.target) as client:
        assert client.classify("sentiment", ["a fine flight"])[0].label
    assert "gRPC front: grpcio" in caplog.text
    why = "--keepalive-max-ping-strikes 2" if native_installed() else "pygrpc-native is not installed"
    assert why in caplog.text, caplog.text


@needs_native
def test_a_server_asked_for_native_with_tls_is_refused_before_loading_anything(tmp_path):
    fields, _ = UNSERVABLE["tls"]
    settings = ServerSettings(models=tmp_path / "missing", port=0, grpc_front="native", **fields)
    with pytest.raises(FrontUnavailable, match=r"TLS \(--tls-cert-file"):  # not the missing repository
        with BackgroundServer(settings):
            pass
