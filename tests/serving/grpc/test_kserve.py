"""The KServe v2 service against unmodified tritonclient[grpc], on a real server on port 0
serving the bundled models plus a plain ONNX tensor model, on each gRPC front."""

from __future__ import annotations

import queue
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from serving.grpc.client import RnnServeClient
from serving.grpc.generated.inference import inference_pb2 as pb
from serving.grpc.generated.inference import inference_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]
TEXTS = ["what a wonderful flight", "my bags were lost again", "the app keeps crashing"]


def _adder(folder: Path) -> None:
    """A plain ONNX model without a card: y = x + 1, z = 2 * x over FP32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Mul", ["x", "two"], ["z"])], "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("repository")
    for name in ("sentiment", "keywords"):
        shutil.copytree(ROOT / "models" / name, repository / name)
    _adder(repository / "adder" / "1")
    return repository


@pytest.fixture(scope="module")
def server(repository, front_settings):
    with BackgroundServer(ServerSettings(models=repository, port=0, **front_settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    connected = triton.InferenceServerClient(url=server.target)
    yield connected
    connected.close()


@pytest.fixture(scope="module")
def typed(server):
    with RnnServeClient(server.target) as connected:
        yield connected


def test_liveness_readiness_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sentiment") and client.is_model_ready("adder", "1")
    metadata = client.get_server_metadata()
    assert metadata.name == "rnnserve" and metadata.version
    text = client.get_model_metadata("sentiment")
    assert text.platform == "onnxruntime_onnx" and list(text.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in text.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in text.outputs] == [
        ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, 3])]
    audio = client.get_model_metadata("keywords")
    assert [(t.name, t.datatype, list(t.shape)) for t in audio.inputs] == [("audio", "FP32", [-1, -1])]
    tensor = client.get_model_metadata("adder")
    assert [(t.name, t.datatype, list(t.shape)) for t in tensor.inputs] == [("x", "FP32", [-1, 4])]
    assert [t.name for t in tensor.outputs] == ["y", "z"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as error:
        client.is_model_ready("nope")
    assert "NOT_FOUND" in str(error.value.status())
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("sentiment", "7")
    assert "NOT_FOUND" in str(error.value.status())


def test_text_inference_equals_the_typed_api(client, typed):
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = client.infer("sentiment", [text], request_id="r1")
    expected = typed.classify("sentiment", TEXTS)
    assert [label.decode() for label in result.as_numpy("label")] == [r.label for r in expected]
    np.testing.assert_allclose(result.as_numpy("probabilities"), [list(r.probabilities) for r in expected], atol=1e-6)
    assert result.get_response().id == "r1"


def test_requested_outputs_are_honoured_and_n_by_1_text_is_accepted(client):
    text = triton.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"great"], [b"awful"]], dtype=object))
    result = client.infer("sentiment", [text], outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("probabilities").shape == (2, 3) and result.as_numpy("label") is None


def test_typed_contents_work_as_well_as_raw_bytes(server, typed):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    request = pb.ModelInferRequest(model_name="sentiment", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(TEXTS)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS]))])
    response = stub.ModelInfer(request)
    probabilities = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(len(TEXTS), 3)
    expected = [list(r.probabilities) for r in typed.classify("sentiment", TEXTS)]
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_audio_inference_equals_the_typed_api(client, typed):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clips = np.stack([0.3 * np.sin(2 * np.pi * 300 * t) * (t > 0.4), 0.01 * rng.standard_normal(16000)])
    audio = triton.InferInput("audio", list(clips.shape), "FP32")
    audio.set_data_from_numpy(clips.astype(np.float32))
    result = client.infer("keywords", [audio])
    expected = typed.classify_audio("keywords", list(clips.astype(np.float32)), sample_rate_hz=16000)
    assert [label.decode() for label in result.as_numpy("label")] == [r.label for r in expected]
    np.testing.assert_allclose(result.as_numpy("probabilities"), [list(r.probabilities) for r in expected],
                               atol=1e-5)


def test_plain_tensor_model_in_and_out(client):
    x = triton.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))
    result = client.infer("adder", [x], outputs=[triton.InferRequestedOutput("z")])
    np.testing.assert_array_equal(result.as_numpy("z"), 2 * np.arange(8, dtype=np.float32).reshape(2, 4))
    both = client.infer("adder", [x])
    np.testing.assert_array_equal(both.as_numpy("y"), np.arange(8, dtype=np.float32).reshape(2, 4) + 1)


@pytest.mark.parametrize("model, name, datatype, data, message", [
    ("adder", "x", "FP64", np.zeros((2, 4)), "dtype float64, the model takes float32"),
    ("adder", "x", "FP32", np.zeros((2, 5), np.float32), "axis 1 is 5, the model takes 4"),
    ("adder", "w", "FP32", np.zeros((2, 4), np.float32), "missing ['x'], unknown ['w']"),
    ("sentiment", "text", "BYTES", np.array([b"\xff\xfe"], dtype=object), "inputs[text][0]: not valid UTF-8"),
    ("sentiment", "words", "BYTES", np.array([b"hi"], dtype=object), "takes one input named 'text'"),
    ("sentiment", "text", "BYTES", np.array([b"   "], dtype=object), "texts[0]: empty text"),
    ("keywords", "audio", "FP64", np.zeros((1, 16000)), "expected FP32 samples"),
    ("keywords", "audio", "FP32", np.zeros((1, 100), np.float32), "shorter than one 30 ms frame"),
])
def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving(client, model, name, datatype, data, message):
    tensor = triton.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, [tensor])
    assert "INVALID_ARGUMENT" in str(error.value.status()) and message in error.value.message()
    assert client.is_server_ready()


def test_raw_contents_that_do_not_match_the_shape_are_refused(server):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    request = pb.ModelInferRequest(
        model_name="adder", inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 4])],
        raw_input_contents=[b"\0" * 12],
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 32 bytes of FP32, got 12" in error.value.details()


def test_stream_infer_answers_each_request_and_survives_a_bad_one(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        good = triton.InferInput("text", [1], "BYTES")
        good.set_data_from_numpy(np.array([b"I love it"], dtype=object))
        bad = triton.InferInput("text", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b""], dtype=object))
        client.async_stream_infer("sentiment", [good], request_id="a")
        client.async_stream_infer("sentiment", [bad], request_id="b")
        client.async_stream_infer("sentiment", [good], request_id="c")
        answers = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert answers[0][1] is None and answers[0][0].get_response().id == "a"
    assert answers[1][0] is None and "texts[0]: empty text" in str(answers[1][1])
    assert answers[2][1] is None and answers[2][0].as_numpy("label")[0] in (b"negative", b"neutral", b"positive")


def test_audio_at_another_rate_with_the_sample_rate_parameter(client, typed):
    t = np.arange(8000) / 8000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * (t > 0.5)).astype(np.float32)
    audio = triton.InferInput("audio", [1, 8000], "FP32")
    audio.set_data_from_numpy(clip[None])
    result = client.infer("keywords", [audio], parameters={"sample_rate_hz": 8000})
    (expected,) = typed.classify_audio("keywords", [clip], sample_rate_hz=8000)
    np.testing.assert_allclose(result.as_numpy("probabilities")[0], list(expected.probabilities), atol=1e-5)
    with pytest.raises(InferenceServerException) as error:
        client.infer("keywords", [audio], parameters={"sample_rate_hz": "fast"})
    assert "parameters[sample_rate_hz]" in error.value.message()
