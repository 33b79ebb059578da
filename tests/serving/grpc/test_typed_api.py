"""The typed API, health and reflection over a real gRPC channel against a real server on port 0,
on each gRPC front (grpcio, and pygrpc-native where installed)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.grpc.client import RnnServeClient
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings
from serving.text import TextEncoder
from training.export import load_run


@pytest.fixture(scope="module")
def server(model_repository, front_settings):
    with BackgroundServer(ServerSettings(models=model_repository, port=0, **front_settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with RnnServeClient(server.target) as connected:
        yield connected


def test_list_models(client):
    (summary,) = client.list_models()
    assert summary.name == "sentiment"
    assert list(summary.versions) == ["1"] and summary.latest_version == "1"
    assert summary.task == "text_classification" and summary.ready and not summary.reason


def test_get_model(client):
    info = client.get_model("sentiment")
    assert info.version == "1" and list(info.labels) == ["negative", "neutral", "positive"]
    assert info.execution_provider == "CPUExecutionProvider"
    assert [(t.name, t.dtype) for t in info.inputs] == [("input_ids", "int64"), ("lengths", "int64")]
    assert [(t.name, t.dtype, list(t.shape)) for t in info.outputs] == [("logits", "float32", [-1, 3])]
    assert info.limits.max_batch_size == 256 and info.limits.max_tokens > 0
    assert float(info.properties["test_accuracy"]) > 0.5


def test_classify_matches_pytorch(client, quick_run, test_texts):
    """Served probabilities equal the trained PyTorch model's on the same texts (padded batch)."""
    results = client.classify("sentiment", test_texts[:64])
    run, model = load_run(quick_run)
    encoder = TextEncoder.from_file(quick_run / "tokenizer.json", run["train_config"]["max_tokens"])
    input_ids, lengths = encoder.pad(encoder.token_ids(test_texts[:64]))
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(input_ids), torch.from_numpy(lengths)), dim=1).numpy()
    served = np.array([list(r.probabilities) for r in results])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    labels = run["labels"]
    assert [r.label for r in results] == [labels[i] for i in expected.argmax(1)]
    assert all(abs(r.score - max(r.probabilities)) < 1e-7 for r in results)


def test_result_is_independent_of_batch_company(client, test_texts):
    alone = client.classify("sentiment", [test_texts[0]])[0]
    in_batch = client.classify("sentiment", test_texts[:50])[0]
    np.testing.assert_allclose(alone.probabilities, in_batch.probabilities, atol=1e-5)


def test_top_k(client):
    (result,) = client.classify("sentiment", ["the flight was fine"], top_k=2)
    assert len(result.top) == 2
    assert result.top[0].label == result.label and result.top[0].score >= result.top[1].score


@pytest.mark.parametrize(
    ("request_fields", "code", "fragment"),
    [
        ({"model": "nope", "texts": ["hi"]}, grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        ({"model": "sentiment", "version": "9", "texts": ["hi"]}, grpc.StatusCode.NOT_FOUND, "no version '9'"),
        ({"model": "sentiment", "texts": []}, grpc.StatusCode.INVALID_ARGUMENT, "texts: empty"),
        ({"model": "sentiment", "texts": ["ok", "  "]}, grpc.StatusCode.INVALID_ARGUMENT, "texts[1]: empty"),
        ({"model": "sentiment", "texts": ["x" * 5000]}, grpc.StatusCode.INVALID_ARGUMENT, "limit 4096"),
        ({"model": "sentiment", "texts": ["a"] * 257}, grpc.StatusCode.INVALID_ARGUMENT, "limit 256"),
        ({"model": "sentiment", "texts": ["a"], "top_k": 4}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"model": "", "texts": ["a"]}, grpc.StatusCode.INVALID_ARGUMENT, "model: empty"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, request_fields, code, fragment):
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.Classify(pb.ClassifyRequest(**request_fields), timeout=10)
    assert raised.value.code() == code
    assert fragment in raised.value.details()
    assert client.classify("sentiment", ["still serving?"])[0].label


def test_invalid_utf8_on_the_wire_is_invalid_argument(server, client):
    """A string field holding invalid UTF-8 cannot be decoded: INVALID_ARGUMENT, never UNKNOWN."""
    with grpc.insecure_channel(server.target) as channel:
        classify = channel.unary_unary("/rnnserve.v1.RnnServe/Classify")
        with pytest.raises(grpc.RpcError) as raised:
            classify(b"\x0a\x03\xff\xfe\xfd\x1a\x02hi", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rnnserve.v1.ClassifyRequest" in raised.value.details()
    assert client.classify("sentiment", ["still serving?"])[0].label


def test_get_unknown_model_is_not_found(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.get_model("nope")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_overall_and_per_model(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.RnnServe", "sentiment"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"rnnserve.v1.RnnServe", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("symbol", ["rnnserve.v1.RnnServe", "inference.GRPCInferenceService",
                                    "inference.ModelInferRequest", "grpc.health.v1.Health"])
def test_reflection_describes_every_service(server, symbol):
    """What grpcurl and Postman do: fetch the file defining a symbol, then its messages."""
    from google.protobuf import descriptor_pb2

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
    assert not response.HasField("error_response"), response.error_response.error_message
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    package, _, name = symbol.rpartition(".")
    defining = [f for f in files if f.package == package]
    assert defining and any(name in [*(s.name for s in f.service), *(m.name for m in f.message_type)]
                            for f in defining)


def test_message_over_the_size_limit_is_resource_exhausted(model_repository, front_settings):
    settings = ServerSettings(models=model_repository, port=0, max_message_bytes=2048, **front_settings)
    with BackgroundServer(settings) as small, RnnServeClient(small.target) as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.classify("sentiment", ["a fine day"] * 300)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.classify("sentiment", ["a fine day"])[0].label


def test_a_busy_port_is_an_error_not_a_shared_port(server, model_repository, front_settings):
    with pytest.raises(OSError, match="cannot bind"):
        with BackgroundServer(ServerSettings(models=model_repository, port=server.port, **front_settings)):
            pass
