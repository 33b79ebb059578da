"""The server-side benchmark's load (benchmarks/h2load.py): its prebuilt gRPC body is one valid
KServe v2 ModelInferRequest, and a real server on port 0 answers it through h2load with
grpc-status 0 (skipped where h2load or curl is not installed)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.grpc.generated.inference import inference_pb2 as pb
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings
from serving.tensors import decode_bytes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import h2load  # noqa: E402  (benchmarks/ is not a package)

TEXT = "my bags were lost again"


def test_the_prebuilt_ids_body_is_one_model_infer_request():
    ids = np.arange(64, dtype=np.int64).reshape(1, 64)
    body = h2load.ids_body("lstm", ids)
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    request = pb.ModelInferRequest.FromString(h2load.grpc_unframe(body))
    assert request.model_name == "lstm"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("ids", "INT64", [1, 64])]
    assert np.array_equal(np.frombuffer(request.raw_input_contents[0], "<i8").reshape(1, 64), ids)


def test_the_prebuilt_text_body_carries_the_text_as_raw_bytes():
    request = pb.ModelInferRequest.FromString(h2load.grpc_unframe(h2load.text_body("sentiment", TEXT)))
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("text", "BYTES", [1])]
    assert decode_bytes(request.raw_input_contents[0], 1, "text") == [TEXT.encode()]


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00\x01x", b"\x00\x00\x00\x00\x02x"])
def test_unframe_refuses_what_is_not_one_uncompressed_message(data):
    with pytest.raises(ValueError):
        h2load.grpc_unframe(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(ROOT / "models" / "sentiment", repository / "sentiment")
    with BackgroundServer(ServerSettings(models=repository, port=0)) as running:
        yield running


@pytest.mark.skipif(bool(h2load.missing_tools()), reason="needs h2load (nghttp2-client) and curl")
def test_a_real_server_answers_the_body_with_grpc_status_0_under_h2load(server, tmp_path):
    body = tmp_path / "sentiment.body"
    body.write_bytes(h2load.text_body("sentiment", TEXT))
    response = pb.ModelInferResponse.FromString(h2load.probe(server.target, body))
    assert {output.name for output in response.outputs} == {"label", "probabilities"}
    result = h2load.run(server.target, body, response.ByteSize(), in_flight=4, connections=2, warmup_s=0.5,
                        seconds=1)
    assert result["requests"] > 0 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


@pytest.mark.skipif(bool(h2load.missing_tools()), reason="needs h2load (nghttp2-client) and curl")
def test_the_probe_fails_loudly_on_a_grpc_error(server, tmp_path):
    body = tmp_path / "unknown.body"
    body.write_bytes(h2load.text_body("no-such-model", TEXT))
    with pytest.raises(h2load.ProbeFailed, match="grpc-status 5"):
        h2load.probe(server.target, body)
