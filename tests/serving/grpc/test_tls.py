"""TLS and mutual TLS from certificate files made here with openssl; grpcio serves them, also
under --grpc-front auto (the native front is plaintext only)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import grpc
import pytest

from serving.grpc.client import RnnServeClient
from serving.grpc.front import native_installed
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=rnnserve test CA", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extension in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *extension, cwd=folder)
    return folder


@pytest.mark.parametrize("front", ["grpcio", "auto"])
def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(pki, front, caplog):
    settings = ServerSettings(models=ROOT / "models", port=0, tls_cert_file=pki / "server.crt",
                              tls_key_file=pki / "server.key", grpc_front=front)
    with caplog.at_level(logging.INFO, logger="serving.grpc.front"), BackgroundServer(settings) as server:
        assert "gRPC front: grpcio" in caplog.text
        with RnnServeClient(server.target, tls_ca=(pki / "ca.crt").read_bytes()) as client:
            assert client.classify("sentiment", ["secure and happy"])[0].label
        with RnnServeClient(server.target, timeout_s=5) as plaintext, pytest.raises(grpc.RpcError) as error:
            plaintext.list_models()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("front", ["grpcio", "auto"])
def test_mutual_tls_needs_a_client_certificate(pki, front, caplog):
    settings = ServerSettings(models=ROOT / "models", port=0, tls_cert_file=pki / "server.crt",
                              tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt",
                              grpc_front=front, keepalive_max_ping_strikes=0)
    ca = (pki / "ca.crt").read_bytes()
    with caplog.at_level(logging.INFO, logger="serving.grpc.front"), BackgroundServer(settings) as server:
        assert "gRPC front: grpcio" in caplog.text
        if front == "auto" and native_installed():
            assert "mutual TLS" in caplog.text, caplog.text
        with RnnServeClient(server.target, tls_ca=ca, tls_cert=(pki / "client.crt").read_bytes(),
                            tls_key=(pki / "client.key").read_bytes()) as client:
            assert client.list_models()
        with RnnServeClient(server.target, tls_ca=ca, timeout_s=5) as anonymous, pytest.raises(grpc.RpcError) as error:
            anonymous.list_models()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_asyncio_client_and_health_probe_under_mutual_tls(pki):
    import asyncio
    import sys

    from serving.grpc.client import AsyncRnnServeClient

    settings = ServerSettings(models=ROOT / "models", port=0, tls_cert_file=pki / "server.crt",
                              tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    ca, cert, key = ((pki / name).read_bytes() for name in ("ca.crt", "client.crt", "client.key"))

    async def classify(target: str) -> str:
        async with AsyncRnnServeClient(target, tls_ca=ca, tls_cert=cert, tls_key=key) as client:
            return (await client.classify("sentiment", ["mutually trusted"]))[0].label

    with BackgroundServer(settings) as server:
        assert asyncio.run(classify(server.target))
        probe = [sys.executable, "-m", "serving", "health", "--target", server.target,
                 "--tls-ca-file", str(pki / "ca.crt")]
        with_cert = subprocess.run([*probe, "--tls-cert-file", str(pki / "client.crt"), "--tls-key-file",
                                    str(pki / "client.key")], capture_output=True, text=True, timeout=60)
        assert with_cert.returncode == 0 and "SERVING" in with_cert.stdout
        without = subprocess.run([*probe, "--timeout-s", "2"], capture_output=True, text=True, timeout=60)
        assert without.returncode == 1 and "UNAVAILABLE" in without.stderr
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        AsyncRnnServeClient("127.0.0.1:1", tls_ca=ca, tls_cert=cert)


def test_half_a_tls_configuration_is_refused(pki):
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        ServerSettings(tls_cert_file=pki / "server.crt").server_credentials()
    with pytest.raises(ValueError, match="tls_client_ca_file needs"):
        ServerSettings(tls_client_ca_file=pki / "ca.crt").server_credentials()
