"""Bearer-token authentication on a real server: every RPC but health needs the token, on each
gRPC front (the native one runs the same interceptor)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.grpc.client import RnnServeClient
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, front_settings):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    settings = ServerSettings(models=ROOT / "models", port=0, auth_token_file=token_file, **front_settings)
    with BackgroundServer(settings) as running:
        yield running


def test_typed_api_needs_the_token(server):
    with RnnServeClient(server.target, token=TOKEN) as client:
        assert client.classify("sentiment", ["great"])[0].label
    for token, message in ((None, "authorization: missing"), ("wrong", "authorization: wrong token")):
        with RnnServeClient(server.target, token=token) as client, pytest.raises(grpc.RpcError) as error:
            client.list_models()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in error.value.details()


def test_kserve_needs_the_token_including_streams(server):
    client = triton.InferenceServerClient(url=server.target)
    with pytest.raises(InferenceServerException) as error:
        client.is_server_ready()
    assert "UNAUTHENTICATED" in str(error.value.status())
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_ready(headers=headers)
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"fine"], dtype=object))
    assert client.infer("sentiment", [text], headers=headers).as_numpy("label")[0]
    client.close()


def test_health_stays_open(server):
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_stream_without_the_token_is_refused(server):
    import queue

    results: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(url=server.target)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"fine"], dtype=object))
    try:
        client.async_stream_infer("sentiment", [text])
    except InferenceServerException:
        pass  # the server may close the refused stream before the request goes out
    result, error = results.get(timeout=30)
    client.stop_stream()
    client.close()
    assert result is None and "UNAUTHENTICATED" in str(error)


def test_asyncio_client_with_many_concurrent_calls(server):
    import asyncio

    from serving.grpc.client import AsyncRnnServeClient

    async def main():
        async with AsyncRnnServeClient(server.target, token=TOKEN) as client:
            names = [m.name for m in await client.list_models()]
            results = await asyncio.gather(*(client.classify("sentiment", [f"text number {i}"]) for i in range(20)))
            info = await client.get_model("keywords")
            audio = await client.classify_audio("keywords", [[0.0] * 16000], sample_rate_hz=16000)
        return names, results, info, audio

    names, results, info, audio = asyncio.run(main())
    assert "sentiment" in names and len(results) == 20 and all(r[0].label for r in results)
    assert info.limits.sample_rate_hz == 16000 and audio[0].label == "_silence_"


def test_refusals_are_counted(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    settings = ServerSettings(models=ROOT / "models", port=0, auth_token_file=token_file, metrics_port=0)
    with BackgroundServer(settings) as running:
        for token in (None, "wrong"):
            with RnnServeClient(running.target, token=token) as client, pytest.raises(grpc.RpcError):
                client.classify("sentiment", ["great"])
        with urllib.request.urlopen(f"http://127.0.0.1:{running.running.metrics_port}/metrics", timeout=10) as page:
            body = page.read().decode()
    line = 'rnnserve_requests_total{code="UNAUTHENTICATED",method="Classify",model="_unknown_"} 2.0'
    assert line in body
