"""Bad input on every surface of a real server on port 0 (real ONNX Runtime sessions): the typed
API, KServe v2 (tritonclient and raw stubs), streams (typed Stream RPC, KServe sequences over
ModelInfer and ModelStreamInfer), the message size limit, and `rnnserve score` as a subprocess.

Every case asserts the exact status code (never UNKNOWN or INTERNAL), that the message names
the field (and the limit where there is one), and then that a valid request on the same surface
succeeds on the same server. The last test checks that the server is still alive and serving
and that it counted no INTERNAL answer.

Also covered elsewhere (not repeated here): top_k over the label count, 257 texts, empty model
name (tests/serving/grpc/test_typed_api.py); FP64 audio, audio shorter than one frame, raw FP32
byte-size mismatch, ModelStreamInfer surviving a bad request (test_kserve.py); second config,
text chunk to an audio stream, threshold out of range, NaN chunk, sequence chunk after end,
several fragments in one sequence request (test_streaming.py); odd PCM16 bytes and a 100-sample
clip at rate 0 (test_audio_api.py).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import soundfile
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from serving.grpc.generated.inference import inference_pb2 as kpb
from serving.grpc.generated.inference import inference_pb2_grpc
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
T = kpb.ModelInferRequest.InferInputTensor


def _adder(folder: Path) -> None:
    """A plain ONNX tensor model without a card: y = x + 1 over FP32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repository")
    for name in ("sentiment", "keywords"):
        shutil.copytree(ROOT / "models" / name, folder / name)
    _adder(folder / "adder" / "1")
    return folder


@dataclass
class Clients:
    server: BackgroundServer
    channel: grpc.Channel
    typed: rnnserve_pb2_grpc.RnnServeStub
    kserve: inference_pb2_grpc.GRPCInferenceServiceStub
    triton: triton.InferenceServerClient
    small: BackgroundServer | None = None
    small_channel: grpc.Channel | None = None
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def clients(repository):
    settings = ServerSettings(models=repository, port=0)
    small_settings = ServerSettings(models=repository, port=0, max_message_bytes=4096)
    with BackgroundServer(settings) as server, BackgroundServer(small_settings) as small:
        channel = grpc.insecure_channel(server.target)
        small_channel = grpc.insecure_channel(small.target)
        client = triton.InferenceServerClient(url=server.target)
        yield Clients(server, channel, rnnserve_pb2_grpc.RnnServeStub(channel),
                      inference_pb2_grpc.GRPCInferenceServiceStub(channel), client, small, small_channel)
        client.close()
        channel.close()
        small_channel.close()


# -- how each surface reports an error: (status code, message) ------------------------------------

def _outcome(call) -> tuple[grpc.StatusCode | None, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    except InferenceServerException as error:
        name = str(error.status()).removeprefix("StatusCode.")
        return grpc.StatusCode[name], error.message()
    return None, "the call succeeded"


def _stream_error(clients: Clients, requests: list[pb.StreamRequest]):
    """A typed Stream call that must fail; responses before the failure are drained."""
    list(clients.typed.Stream(iter(requests), timeout=30))


def _stream_infer_error(clients: Clients, request: kpb.ModelInferRequest) -> None:
    """ModelStreamInfer answers a failed request with error_message "<CODE>: <message>" and goes on;
    raised here as an RpcError look-alike so every case is checked the same way."""
    responses = list(clients.kserve.ModelStreamInfer(iter([request]), timeout=30))
    assert len(responses) == 1
    message = responses[0].error_message
    if message:
        code, _, details = message.partition(": ")
        raise _StreamFailure(grpc.StatusCode[code], details)


class _StreamFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


# -- requests ------------------------------------------------------------------------------------

def classify(**fields):
    return lambda c: c.typed.Classify(pb.ClassifyRequest(**fields), timeout=30)


def clip(**fields):
    return classify(model="keywords", audio=[pb.AudioClip(**fields)])


def samples(values, rate=16000, **fields):
    return clip(samples=pb.FloatSamples(values=list(values)), sample_rate_hz=rate, **fields)


def infer(model="sentiment", inputs=(), raw=(), outputs=(), version="", **parameters):
    def params():
        result = {}
        for name, value in parameters.items():
            if isinstance(value, bool):
                result[name] = kpb.InferParameter(bool_param=value)
            elif isinstance(value, int):
                result[name] = kpb.InferParameter(int64_param=value)
            elif isinstance(value, float):
                result[name] = kpb.InferParameter(double_param=value)
            else:
                result[name] = kpb.InferParameter(string_param=value)
        return result

    request = kpb.ModelInferRequest(
        model_name=model, model_version=version, inputs=list(inputs), raw_input_contents=list(raw),
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs], parameters=params(),
    )
    return lambda c: c.kserve.ModelInfer(request, timeout=30)


def text_tensor(*items: bytes, name="text", shape=None):
    return T(name=name, datatype="BYTES", shape=shape or [len(items)],
             contents=kpb.InferTensorContents(bytes_contents=list(items)))


def audio_tensor(values, shape=None, name="audio"):
    values = list(values)
    return T(name=name, datatype="FP32", shape=shape or [1, len(values)],
             contents=kpb.InferTensorContents(fp32_contents=values))


def x_tensor(rows=1, name="x", datatype="FP32", shape=None):
    if datatype == "INT64":
        contents = kpb.InferTensorContents(int64_contents=[0] * rows * 4)
    else:
        contents = kpb.InferTensorContents(fp32_contents=[0.0] * rows * 4)
    return T(name=name, datatype=datatype, shape=shape or [rows, 4], contents=contents)


def tritonclient_infer(model, name, datatype, data, outputs=None):
    def call(c):
        tensor = triton.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
        return c.triton.infer(model, [tensor], outputs=requested)

    return call


def stream(*requests):
    return lambda c: _stream_error(c, list(requests))


def config(model="sentiment", **fields):
    return pb.StreamRequest(config=pb.StreamConfig(model=model, **fields))


def chunk(**fields):
    return pb.StreamRequest(chunk=pb.StreamChunk(**fields))


def raw_stream(*messages: bytes):
    """The typed Stream RPC with hand-made wire bytes (e.g. invalid UTF-8 in chunk.text)."""
    def call(c):
        method = c.channel.stream_stream("/rnnserve.v1.RnnServe/Stream")
        list(method(iter(messages), timeout=30))

    return call


_sequence_ids = iter(range(10_000, 20_000))


def sequence(model="sentiment", inputs=(), start=True, end=False, sequence_id=None, **parameters):
    """One KServe sequence request (a fresh id per case unless given)."""
    def call(c):
        sid = next(_sequence_ids) if sequence_id is None else sequence_id
        flags = {"sequence_id": sid, **({"sequence_start": True} if start else {}),
                 **({"sequence_end": True} if end else {}), **parameters}
        return infer(model, inputs, **flags)(c)

    return call


def stream_infer(model="sentiment", inputs=(), **parameters):
    def call(c):
        values = {k: (kpb.InferParameter(bool_param=v) if isinstance(v, bool) else kpb.InferParameter(int64_param=v))
                  for k, v in parameters.items()}
        _stream_infer_error(c, kpb.ModelInferRequest(model_name=model, inputs=list(inputs), parameters=values))

    return call


def small_classify(texts):
    return lambda c: rnnserve_pb2_grpc.RnnServeStub(c.small_channel).Classify(
        pb.ClassifyRequest(model="sentiment", texts=texts), timeout=30)


def small_infer(rows):
    request = kpb.ModelInferRequest(model_name="adder", inputs=[x_tensor(rows)])
    return lambda c: inference_pb2_grpc.GRPCInferenceServiceStub(c.small_channel).ModelInfer(request, timeout=30)


def small_stream(text):
    return lambda c: list(rnnserve_pb2_grpc.RnnServeStub(c.small_channel).Stream(
        iter([config("sentiment"), chunk(text=text)]), timeout=30))


def _wav(rate_field: int) -> bytes:
    """A 0.1 s PCM16 WAV whose header then gets `rate_field` as its sample rate."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1600, np.float32), 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    data[24:28] = rate_field.to_bytes(4, "little")
    return bytes(data)


# -- the cases -----------------------------------------------------------------------------------

LONG = "x" * 4097
NAN_AUDIO = [math.nan] * 1600
INF_AUDIO = [0.0] * 800 + [math.inf] * 800
SEQ_MAX = "s" * 257

CASES = [
    # typed API: Classify and GetModel
    ("typed-empty-batch", classify(model="sentiment"), INVALID, ["texts: empty", "1 to 256"]),
    ("typed-empty-text", classify(model="sentiment", texts=["fine", ""]), INVALID, ["texts[1]: empty text"]),
    ("typed-text-over-limit", classify(model="sentiment", texts=[LONG]), INVALID,
     ["texts[0]", "4097 characters", "limit 4096"]),
    ("typed-unknown-model", classify(model="nope", texts=["hi"]), NOT_FOUND, ["model 'nope' not found"]),
    ("typed-unknown-version", classify(model="sentiment", version="7", texts=["hi"]), NOT_FOUND,
     ["'sentiment' has no version '7'"]),
    ("typed-get-unknown-version", lambda c: c.typed.GetModel(pb.GetModelRequest(name="keywords", version="99")),
     NOT_FOUND, ["'keywords' has no version '99'"]),
    ("typed-texts-and-audio", classify(model="keywords", texts=["yes"], audio=[pb.AudioClip(file=b"x")]), INVALID,
     ["texts and audio"]),
    ("typed-wrong-kind-texts", classify(model="keywords", texts=["yes"]), INVALID, ["does not take texts"]),
    ("typed-audio-nan", samples(NAN_AUDIO), INVALID, ["audio[0].samples", "NaN or infinite"]),
    ("typed-audio-inf", samples(INF_AUDIO), INVALID, ["audio[0].samples", "NaN or infinite"]),
    ("typed-audio-over-limit", samples(np.zeros(30 * 8000 + 1), rate=8000), INVALID,
     ["audio[0]", "30.00 s of audio, limit 30 s"]),
    ("typed-audio-pcm16-over-limit", clip(pcm16=b"\0\0" * (31 * 16000), sample_rate_hz=16000), INVALID,
     ["audio[0]", "limit 30 s"]),
    ("typed-undecodable-wav", clip(file=b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk"), INVALID,
     ["audio[0].file", "not a readable WAV/FLAC/OGG"]),
    ("typed-wav-rate-zero", clip(file=_wav(0)), INVALID, ["audio[0].file", "not a readable"]),
    ("typed-raw-rate-zero", samples([0.0] * 1600, rate=0), INVALID, ["audio[0].sample_rate_hz: 0", "1 to 384000"]),
    ("typed-raw-rate-too-high", clip(pcm16=b"\0\0" * 1600, sample_rate_hz=400_000), INVALID,
     ["audio[0].sample_rate_hz: 400000", "1 to 384000"]),
    ("typed-invalid-utf8", lambda c: c.channel.unary_unary("/rnnserve.v1.RnnServe/Classify")(
        pb.ClassifyRequest(model="sentiment").SerializeToString() + b"\x1a\x03\xff\xfe\xfd", timeout=30),
     INVALID, ["rnnserve.v1.ClassifyRequest", "texts[0]: not valid UTF-8"]),
    ("typed-garbage-bytes", lambda c: c.channel.unary_unary("/rnnserve.v1.RnnServe/Classify")(
        b"\xff\xff\xff\xff", timeout=30), INVALID, ["not a valid rnnserve.v1.ClassifyRequest"]),

    # KServe v2 through unmodified tritonclient
    ("v2-empty-batch", tritonclient_infer("sentiment", "text", "BYTES", np.zeros(0, dtype=object)), INVALID,
     ["texts: empty", "1 to 256"]),
    ("v2-wrong-dtype-text", tritonclient_infer("sentiment", "text", "INT32", np.zeros(2, np.int32)), INVALID,
     ["inputs[text]", "BYTES"]),
    ("v2-wrong-shape-text", tritonclient_infer("sentiment", "text", "BYTES", np.array([[b"a", b"b"]], object)),
     INVALID, ["inputs[text]: shape [1, 2]", "[N]"]),
    ("v2-text-over-limit", tritonclient_infer("sentiment", "text", "BYTES", np.array([LONG.encode()], object)),
     INVALID, ["texts[0]", "limit 4096"]),
    ("v2-audio-nan", tritonclient_infer("keywords", "audio", "FP32", np.full((1, 1600), np.nan, np.float32)),
     INVALID, ["audio[0].samples", "NaN"]),
    ("v2-audio-inf", tritonclient_infer("keywords", "audio", "FP32", np.full((2, 1600), -np.inf, np.float32)),
     INVALID, ["audio[0].samples", "infinite"]),
    ("v2-audio-over-limit", tritonclient_infer("keywords", "audio", "FP32", np.zeros((1, 30 * 16000 + 16), np.float32)),
     INVALID, ["audio[0]", "limit 30 s"]),
    ("v2-audio-wrong-shape", tritonclient_infer("keywords", "audio", "FP32", np.zeros(1600, np.float32)), INVALID,
     ["inputs[audio]: shape [1600]", "[N, samples]"]),
    ("v2-unknown-output", tritonclient_infer("sentiment", "text", "BYTES", np.array([b"hi"], object), ["logits"]),
     INVALID, ["outputs: 'logits'", "label, probabilities"]),
    ("v2-tensor-unknown-output", tritonclient_infer("adder", "x", "FP32", np.zeros((1, 4), np.float32), ["z"]),
     INVALID, ["outputs: model 'adder' has no output 'z'"]),
    ("v2-tensor-wrong-dtype", tritonclient_infer("adder", "x", "INT64", np.zeros((1, 4), np.int64)), INVALID,
     ["inputs[x]: dtype int64", "float32"]),
    ("v2-tensor-wrong-rank", tritonclient_infer("adder", "x", "FP32", np.zeros(4, np.float32)), INVALID,
     ["inputs[x]: 1 axes", "takes 2"]),
    ("v2-unknown-model", lambda c: c.triton.get_model_metadata("nope"), NOT_FOUND, ["model 'nope' not found"]),
    ("v2-unknown-version", lambda c: c.triton.is_model_ready("keywords", "99"), NOT_FOUND,
     ["'keywords' has no version '99'"]),

    # KServe v2 through raw stubs: what tritonclient never sends
    ("v2-missing-inputs", infer("sentiment"), INVALID, ["inputs", "one input named 'text'", "got []"]),
    ("v2-extra-input", infer("sentiment", [text_tensor(b"hi"), text_tensor(b"hi", name="extra")]), INVALID,
     ["inputs", "'extra'"]),
    ("v2-tensor-missing-input", infer("adder"), INVALID, ["inputs: model 'adder' takes ['x']", "missing ['x']"]),
    ("v2-tensor-extra-input", infer("adder", [x_tensor(), x_tensor(name="w")]), INVALID, ["unknown ['w']"]),
    ("v2-duplicate-input", infer("adder", [x_tensor(), x_tensor()]), INVALID, ["inputs[x]: the input appears twice"]),
    ("v2-raw-size-mismatch", infer("keywords", [T(name="audio", datatype="FP32", shape=[1, 1600])],
                                   raw=[b"\0" * 6399]), INVALID,
     ["inputs[audio]", "needs 6400 bytes of FP32, got 6399"]),
    ("v2-raw-bytes-element-past-end", infer("sentiment", [T(name="text", datatype="BYTES", shape=[1])],
                                            raw=[b"\x10\x00\x00\x00abc"]), INVALID,
     ["inputs[text]", "claims 16 bytes past the end"]),
    ("v2-raw-count-mismatch", infer("sentiment", [text_tensor(b"hi")], raw=[b"", b""]), INVALID,
     ["raw_input_contents: 2 entries for 1 inputs"]),
    ("v2-contents-count-mismatch", infer("adder", [T(name="x", datatype="FP32", shape=[2, 4],
                                                     contents=kpb.InferTensorContents(fp32_contents=[1.0] * 3))]),
     INVALID, ["inputs[x]", "needs 8 values, contents hold 3"]),
    ("v2-shape-product-overflows-int64", infer("keywords", [T(name="audio", datatype="FP32", shape=[2**32, 2**32])],
                                               raw=[b""]), INVALID, ["inputs[audio].shape", "limit"]),
    ("v2-too-many-dims", infer("adder", [T(name="x", datatype="FP32", shape=[1] * 70)], raw=[b"\0" * 4]), INVALID,
     ["inputs[x].shape: 70 dimensions", "limit 32"]),
    ("v2-negative-dim", infer("adder", [T(name="x", datatype="FP32", shape=[-1, 4])], raw=[b""]), INVALID,
     ["inputs[x].shape", "negative"]),
    ("v2-unknown-datatype", infer("adder", [T(name="x", datatype="FLOAT", shape=[1, 4])], raw=[b"\0" * 16]), INVALID,
     ["inputs[x].datatype: 'FLOAT'"]),
    ("v2-invalid-utf8", infer("sentiment", [text_tensor(b"ok", b"\xc3\x28")]), INVALID,
     ["inputs[text][1]: not valid UTF-8"]),
    ("v2-rate-zero", infer("keywords", [audio_tensor([0.0] * 1600)], sample_rate_hz=0), INVALID,
     ["parameters[sample_rate_hz]: 0", "1 to 384000"]),
    ("v2-rate-nan", infer("keywords", [audio_tensor([0.0] * 1600)], sample_rate_hz=math.nan), INVALID,
     ["parameters[sample_rate_hz]", "integer"]),
    ("v2-rate-inf", infer("keywords", [audio_tensor([0.0] * 1600)], sample_rate_hz=math.inf), INVALID,
     ["parameters[sample_rate_hz]", "integer"]),
    ("v2-metadata-unknown-version", lambda c: c.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="adder",
                                                                                              version="2")),
     NOT_FOUND, ["'adder' has no version '2'"]),

    # typed Stream RPC
    ("stream-chunk-before-config", stream(chunk(text="hello")), INVALID, ["chunk before config"]),
    ("stream-unknown-model", stream(config("nope")), NOT_FOUND, ["model 'nope' not found"]),
    ("stream-unknown-version", stream(config("sentiment", version="8")), NOT_FOUND, ["no version '8'"]),
    ("stream-empty-model", stream(config("")), INVALID, ["model: empty"]),
    ("stream-top-k", stream(config("sentiment", top_k=9)), INVALID, ["config.top_k: 9", "3 labels"]),
    ("stream-rate-too-high", stream(config("keywords", sample_rate_hz=500_000)), INVALID,
     ["config.sample_rate_hz: 500000", "1 to 384000"]),
    ("stream-smoothing-over-limit", stream(config("keywords", smoothing_ms=20_000)), INVALID,
     ["config.smoothing_ms", "0 to 10000 ms"]),
    ("stream-audio-inf", stream(config("keywords"), chunk(samples=pb.FloatSamples(values=INF_AUDIO))), INVALID,
     ["chunk.samples", "infinite"]),
    ("stream-audio-over-limit", stream(config("keywords", sample_rate_hz=8000),
                                       chunk(pcm16=b"\0\0" * (30 * 8000 + 8))), INVALID, ["chunk", "limit 30 s"]),
    ("stream-empty-chunk", stream(config("sentiment"), chunk()), INVALID, ["chunk", "streams text"]),
    ("stream-invalid-utf8", raw_stream(config("sentiment").SerializeToString(), b"\x12\x03\x0a\x01\xff"), INVALID,
     ["rnnserve.v1.StreamRequest", "chunk.text: not valid UTF-8"]),

    # KServe sequences (stateful ModelInfer and ModelStreamInfer)
    ("seq-chunk-before-start", sequence(inputs=[text_tensor(b"hi")], start=False), INVALID,
     ["sequence_id", "sequence_start"]),
    ("seq-zero-id", sequence(inputs=[text_tensor(b"hi")], sequence_id=0), INVALID, ["parameters[sequence_id]"]),
    ("seq-id-too-long", sequence(inputs=[text_tensor(b"hi")], sequence_id=SEQ_MAX), INVALID,
     ["parameters[sequence_id]: 257 characters", "limit 256"]),
    ("seq-flag-not-bool", sequence(inputs=[text_tensor(b"hi")], start=False, sequence_start=1), INVALID,
     ["parameters[sequence_start]", "bool"]),
    ("seq-invalid-utf8", sequence(inputs=[text_tensor(b"\xff")]), INVALID, ["inputs[text][0]: not valid UTF-8"]),
    ("seq-text-over-limit", sequence(inputs=[text_tensor(LONG.encode())]), INVALID, ["chunk.text", "limit 4096"]),
    ("seq-audio-nan", sequence("keywords", [audio_tensor(NAN_AUDIO)]), INVALID, ["chunk.samples", "NaN"]),
    ("seq-audio-over-limit", sequence("keywords", [audio_tensor([0.0] * (30 * 16000 + 16))]), INVALID,
     ["chunk", "limit 30 s"]),
    ("seq-audio-rows", sequence("keywords", [audio_tensor([0.0] * 3200, shape=[2, 1600])]), INVALID,
     ["inputs[audio]: shape [2, 1600]", "[1, samples]"]),
    ("seq-rate-zero", sequence("keywords", [audio_tensor([0.0] * 1600)], sample_rate_hz=0), INVALID,
     ["parameters[sample_rate_hz]: 0", "1 to 384000"]),
    ("seq-wrong-input", sequence("keywords", [text_tensor(b"yes")]), INVALID, ["one input named 'audio'"]),
    ("seq-unknown-model", sequence("nope", [text_tensor(b"hi")]), NOT_FOUND, ["model 'nope' not found"]),
    ("streaminfer-chunk-before-start", stream_infer(inputs=[text_tensor(b"hi")], sequence_id=77), INVALID,
     ["sequence_id 77", "sequence_start"]),
    ("streaminfer-wrong-dtype", stream_infer(inputs=[x_tensor()]), INVALID, ["one input named 'text'"]),
    ("streaminfer-unknown-model", stream_infer("nope", [text_tensor(b"hi")]), NOT_FOUND, ["model 'nope'"]),

    # a server with max_message_bytes=4096
    ("size-typed-classify", small_classify(["a fine day"] * 600), EXHAUSTED, ["larger than max", "4096"]),
    ("size-v2-infer", small_infer(400), EXHAUSTED, ["larger than max", "4096"]),
    ("size-typed-stream", small_stream("word " * 2000), EXHAUSTED, ["larger than max", "4096"]),
]


def _valid_after(case_id: str, clients: Clients) -> None:
    """A valid request on the surface the case used, on the same server."""
    surface = case_id.split("-", 1)[0]
    if surface == "typed":
        reply = clients.typed.Classify(pb.ClassifyRequest(model="sentiment", texts=["a fine day"]), timeout=30)
        assert reply.results[0].label in ("negative", "neutral", "positive")
    elif surface == "v2":
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"a fine day"], dtype=object))
        assert clients.triton.infer("sentiment", [text]).as_numpy("label")[0]
        x = clients.kserve.ModelInfer(kpb.ModelInferRequest(model_name="adder", inputs=[x_tensor()]), timeout=30)
        assert np.frombuffer(x.raw_output_contents[0], "<f4").tolist() == [1.0] * 4
    elif surface == "stream":
        responses = list(clients.typed.Stream(iter([config("sentiment"), chunk(text="a fine ")]), timeout=30))
        assert responses[-1].final and responses[-1].running.label
    elif surface in ("seq", "streaminfer"):
        sid = next(_sequence_ids)
        sequence(inputs=[text_tensor(b"a fine ")], sequence_id=sid)(clients)
        reply = sequence(inputs=[text_tensor(b"day")], start=False, end=True, sequence_id=sid)(clients)
        assert reply.outputs[0].name == "label"
        responses = list(clients.kserve.ModelStreamInfer(iter([
            kpb.ModelInferRequest(model_name="sentiment", inputs=[text_tensor(b"fine")])]), timeout=30))
        assert not responses[0].error_message
    elif surface == "size":
        small = rnnserve_pb2_grpc.RnnServeStub(clients.small_channel)
        assert small.Classify(pb.ClassifyRequest(model="sentiment", texts=["a fine day"]), timeout=30).results
    else:  # pragma: no cover
        raise AssertionError(f"no valid request for surface {surface!r}")


@pytest.mark.parametrize(("call", "code", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_naming_the_field_and_the_server_keeps_serving(
    request, clients, call, code, fragments
):
    got, message = _outcome(lambda: call(clients))
    assert got not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), message
    assert got == code, f"{got}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    _valid_after(request.node.callspec.id, clients)


# -- rnnserve score as a subprocess --------------------------------------------------------------

@dataclass(frozen=True)
class CliCase:
    id: str
    files: dict  # name -> bytes, written to the case's folder
    args: list  # {dir}, {models} and {server} are filled in
    exit_code: int
    fragments: list


CLI_CASES = [
    CliCase("invalid-utf8", {"in.txt": b"a fine day\nbroken \xff\xfe bytes\n"},
            ["--model", "sentiment", "--input", "{dir}/in.txt", "--models", "{models}"], 1,
            ["in.txt:2: not valid UTF-8", "--on-error skip"]),
    CliCase("empty-text", {"in.jsonl": b'{"text": "fine"}\n{"text": ""}\n'},
            ["--model", "sentiment", "--input", "{dir}/in.jsonl", "--models", "{models}"], 1,
            ["in.jsonl:2: empty text"]),
    CliCase("text-over-limit-on-server", {"in.txt": b"fine\n" + b"x" * 5000 + b"\n"},
            ["--model", "sentiment", "--input", "{dir}/in.txt", "--server", "{server}"], 1,
            ["in.txt:2: 5000 characters, limit 4096"]),
    CliCase("unknown-model-on-server", {"in.txt": b"fine\n"},
            ["--model", "nope", "--input", "{dir}/in.txt", "--server", "{server}", "--retries", "0"], 2,
            ["NOT_FOUND", "model 'nope' not found"]),
    CliCase("unknown-version", {"in.txt": b"fine\n"},
            ["--model", "sentiment", "--version", "5", "--input", "{dir}/in.txt", "--models", "{models}"], 2,
            ["no version '5'"]),
    CliCase("undecodable-wav", {"clips/a.wav": "speech", "clips/b.wav": b"RIFF\x10\x00\x00\x00WAVEjunk"},
            ["--model", "keywords", "--input", "{dir}/clips", "--models", "{models}"], 1,
            ["b.wav", "not a readable WAV/FLAC/OGG file"]),
    CliCase("wav-rate-zero-on-server", {"clips/a.wav": "rate0"},
            ["--model", "keywords", "--input", "{dir}/clips", "--server", "{server}"], 1,
            ["a.wav", "not a readable WAV/FLAC/OGG file"]),
    CliCase("valid-after-the-bad-ones", {"in.txt": b"a fine day\nlost my bags\n"},
            ["--model", "sentiment", "--input", "{dir}/in.txt", "--server", "{server}"], 0,
            ["scored 2 rows"]),
    CliCase("missing-input", {},
            ["--model", "sentiment", "--input", "{dir}/absent.txt", "--models", "{models}"], 2,
            ["absent.txt", "No such file"]),
]


@pytest.fixture(scope="module")
def cli_results(clients, repository, tmp_path_factory) -> dict:
    """Every CLI case run at once (each is a Python start-up of a few seconds)."""
    folder = tmp_path_factory.mktemp("cli")
    speech = io.BytesIO()
    soundfile.write(speech, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000, format="WAV")
    content = {"speech": speech.getvalue(), "rate0": _wav(0)}

    def run(case: CliCase):
        case_dir = folder / case.id
        case_dir.mkdir()
        for name, data in case.files.items():
            (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / name).write_bytes(content.get(data, data) if isinstance(data, str) else data)
        args = [a.format(dir=case_dir, models=repository, server=clients.server.target) for a in case.args]
        result = subprocess.run([sys.executable, "-m", "serving", "score", *args, "--output",
                                 str(case_dir / "out.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=120)
        return result, case_dir

    with ThreadPoolExecutor(4) as pool:
        return dict(zip([c.id for c in CLI_CASES], pool.map(run, CLI_CASES), strict=True))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_score_cli_refuses_bad_input_with_its_exit_code_and_message(cli_results, clients, case):
    result, case_dir = cli_results[case.id]
    assert result.returncode == case.exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in case.fragments:
        assert fragment in result.stderr, result.stderr
    if case.exit_code:
        assert not (case_dir / "out.jsonl").exists()  # nothing half-written
    else:
        lines = (case_dir / "out.jsonl").read_text().splitlines()
        assert [json.loads(line)["label"] in ("negative", "neutral", "positive") for line in lines] == [True, True]
    _valid_after("typed", clients)


def test_after_every_case_the_server_is_alive_serving_and_counted_no_internal_error(clients):
    for server in (clients.server, clients.small):
        assert server.thread.is_alive() and server.running is not None
        with grpc.insecure_channel(server.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            kserve = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert kserve.ServerLive(kpb.ServerLiveRequest(), timeout=5).live
            assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready
        registry = server.running.dataplane.metrics.registry
        codes = {s.labels.get("code") for metric in registry.collect() for s in metric.samples
                 if s.name == "rnnserve_requests_total"}
        assert codes and not codes & {"INTERNAL", "UNKNOWN"}, codes
    _valid_after("typed", clients)
    _valid_after("v2", clients)
    _valid_after("stream", clients)
    _valid_after("seq", clients)
    # every typed stream the cases opened is closed again (failed sequence starts never open one)
    metrics = clients.server.running.dataplane.metrics.registry
    deadline = time.monotonic() + 2
    while any(metrics.get_sample_value("rnnserve_active_streams", {"model": m}) for m in ("sentiment", "keywords")):
        assert time.monotonic() < deadline, "streams left open"
        time.sleep(0.02)
