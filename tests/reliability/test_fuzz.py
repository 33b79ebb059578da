"""Fuzzing a real `rnnserve serve` process (the CLI, in its own process so its memory can be read):
hypothesis-built typed ClassifyRequests, Stream request sequences, KServe ModelInferRequests
(unary and over ModelStreamInfer) and random bytes put on the wire as the serialized request.

Every answer must carry a status the contract allows for a client mistake (OK, INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED, INVALID_ARGUMENT also for sequence misuse), never UNKNOWN or
INTERNAL; afterwards the server still answers valid requests correctly and its resident memory
grew by less than RSS_GROWTH_LIMIT_MB since the warm-up."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serving.grpc.generated.inference import inference_pb2 as kpb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.tensors import DTYPES

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
RSS_GROWTH_LIMIT_MB = 50
TIMEOUT_S = 30
# Fixed example counts and derandomized generation: the same inputs on every CI run.
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)

TYPED = "/rnnserve.v1.RnnServe/"
KSERVE = "/inference.GRPCInferenceService/"
MODELS = ["sentiment", "topic", "keywords"]


def start_cli_server(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """`rnnserve serve --models models --port 0 FLAGS` as a process; (process, target, log path)."""
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--models", str(ROOT / "models"),
                                    "--port", "0", *flags], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (match := re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(log_path.read_text()[-3000:])
        time.sleep(0.1)
    return process, f"127.0.0.1:{match.group(1)}", log_path


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class Wire:
    """Unary calls with raw bytes in and out (identity serializers): any message, or none."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1),
                                                              ("grpc.max_send_message_length", -1)])
        self.calls = 0

    def unary(self, method: str, payload: bytes) -> tuple[grpc.StatusCode, bytes | str]:
        self.calls += 1
        call = self.channel.unary_unary(method)  # no serializers: bytes on the wire as given
        try:
            return grpc.StatusCode.OK, call(payload, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""

    def stream(self, method: str, payloads: list[bytes]) -> tuple[grpc.StatusCode, list[bytes] | str]:
        self.calls += 1
        call = self.channel.stream_stream(method)
        try:
            return grpc.StatusCode.OK, list(call(iter(payloads), timeout=TIMEOUT_S))
        except grpc.RpcError as error:
            return error.code(), error.details() or ""


def check(code: grpc.StatusCode, answer, what) -> None:
    event(code.name)
    assert code in ALLOWED, f"{code.name} ({answer!r}) for {what!r}"
    if code != grpc.StatusCode.OK:
        assert answer, f"{code.name} without a message for {what!r}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, warmed up with valid requests of every kind and one small fuzz round, and
    its RSS after the warm-up."""
    process, target, log_path = start_cli_server(tmp_path_factory.mktemp("fuzz"), "--stream-idle-timeout-s", "5")
    wire = Wire(target)
    try:
        for _ in range(3):
            valid_requests(wire)
        for payload in np.random.default_rng(0).bytes(20000).split(b"\x00")[:200]:
            for method in ("Classify", "GetModel"):
                wire.unary(TYPED + method, payload)
            wire.unary(KSERVE + "ModelInfer", payload)
        time.sleep(0.5)
        yield {"process": process, "target": target, "wire": wire, "rss_warm": rss_mb(process.pid), "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def valid_requests(wire: Wire) -> None:
    """One valid request of every kind; each answer checked."""
    code, answer = wire.unary(TYPED + "Classify", pb.ClassifyRequest(
        model="sentiment", texts=["what a wonderful flight", "lost my bags again"]).SerializeToString())
    assert code == grpc.StatusCode.OK, answer
    results = pb.ClassifyResponse.FromString(answer).results
    assert [r.label for r in results] == ["positive", "negative"]
    tone = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    code, answer = wire.unary(TYPED + "Classify", pb.ClassifyRequest(model="keywords", audio=[pb.AudioClip(
        samples=pb.FloatSamples(values=tone.tolist()), sample_rate_hz=16000)]).SerializeToString())
    assert code == grpc.StatusCode.OK and len(pb.ClassifyResponse.FromString(answer).results) == 1, answer
    text = kpb.ModelInferRequest(model_name="topic")
    tensor = text.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"the stock market fell sharply today")
    code, answer = wire.unary(KSERVE + "ModelInfer", text.SerializeToString())
    assert code == grpc.StatusCode.OK, answer
    assert kpb.ModelInferResponse.FromString(answer).outputs[0].name == "label"
    stream = [pb.StreamRequest(config=pb.StreamConfig(model="sentiment")),
              pb.StreamRequest(chunk=pb.StreamChunk(text="what a wond")),
              pb.StreamRequest(chunk=pb.StreamChunk(text="erful flight"))]
    code, answer = wire.stream(TYPED + "Stream", [m.SerializeToString() for m in stream])
    assert code == grpc.StatusCode.OK, answer
    final = pb.StreamResponse.FromString(answer[-1])
    assert final.final and final.running.label == "positive"


# -- strategies ------------------------------------------------------------------------------
model_names = st.one_of(st.sampled_from([*MODELS, "nope", "", "sentiment/1", "../models", "SENTIMENT"]),
                        st.text(max_size=40))
versions = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "latest", "999999999999"]), st.text(max_size=10))
texts = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "\x00", "ok", "x" * 4097, "\U0001F600" * 50]))
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
rates = st.one_of(st.sampled_from([0, 1, 8000, 16000, 44100, 48000, 384000, 2**31, 2**32 - 1]),
                  st.integers(0, 2**32 - 1))
uint32 = st.one_of(st.sampled_from([0, 1, 2, 3, 12, 13, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def audio_clips(draw) -> pb.AudioClip:
    kind = draw(st.sampled_from(["file", "pcm16", "samples", "none", "wav"]))
    rate = draw(rates)
    if kind == "file":
        return pb.AudioClip(file=draw(st.binary(max_size=2000)), sample_rate_hz=rate)
    if kind == "wav":  # a RIFF header over random bytes: reaches the decoder's header parsing
        return pb.AudioClip(file=b"RIFF" + draw(st.binary(min_size=4, max_size=8)) + b"WAVEfmt "
                            + draw(st.binary(max_size=200)), sample_rate_hz=rate)
    if kind == "pcm16":
        return pb.AudioClip(pcm16=draw(st.binary(max_size=4000)), sample_rate_hz=rate)
    if kind == "samples":
        values = draw(st.lists(floats32, max_size=200)) * draw(st.sampled_from([1, 1, 40]))
        return pb.AudioClip(samples=pb.FloatSamples(values=values), sample_rate_hz=rate)
    return pb.AudioClip(sample_rate_hz=rate)


random_classify_requests = st.builds(
    pb.ClassifyRequest, model=model_names, version=versions, texts=st.lists(texts, max_size=6)
    | st.sampled_from([[], ["a"] * 300]),
    top_k=uint32, audio=st.lists(audio_clips(), max_size=3),
)


@st.composite
def plausible_classify_requests(draw) -> pb.ClassifyRequest:
    """A request of the right kind for a real model, with random content and limits."""
    model = draw(st.sampled_from(MODELS))
    request = pb.ClassifyRequest(model=model, version=draw(st.sampled_from(["", "", "1"])),
                                 top_k=draw(st.sampled_from([0, 0, 0, 1, 2, 3, 2**32 - 1])))
    if model == "keywords":
        request.audio.extend(draw(st.lists(audio_clips(), min_size=1, max_size=3)))
    else:
        request.texts.extend(draw(st.lists(texts, min_size=1, max_size=8)))
    if draw(st.integers(0, 2)) == 0:
        request.version = draw(versions)
    return request


classify_requests = st.one_of(plausible_classify_requests(), plausible_classify_requests(), random_classify_requests)


@st.composite
def stream_messages(draw) -> pb.StreamRequest:
    if draw(st.booleans()):
        return pb.StreamRequest(config=pb.StreamConfig(
            model=draw(st.sampled_from(MODELS) | model_names), version=draw(versions),
            sample_rate_hz=draw(rates), threshold=draw(floats32), smoothing_ms=draw(uint32),
            refractory_ms=draw(uint32), report_every_ms=draw(uint32), top_k=draw(uint32),
        ))
    kind = draw(st.sampled_from(["text", "pcm16", "samples", "none"]))
    if kind == "text":
        return pb.StreamRequest(chunk=pb.StreamChunk(text=draw(texts)))
    if kind == "pcm16":
        return pb.StreamRequest(chunk=pb.StreamChunk(pcm16=draw(st.binary(max_size=3200))))
    if kind == "samples":
        return pb.StreamRequest(chunk=pb.StreamChunk(samples=pb.FloatSamples(values=draw(st.lists(floats32,
                                                                                                   max_size=400)))))
    return pb.StreamRequest(chunk=pb.StreamChunk())


@st.composite
def stream_sequences(draw) -> list[pb.StreamRequest]:
    """Mostly a well-formed start (a config of a real model) followed by random messages."""
    messages = draw(st.lists(stream_messages(), max_size=6))
    if draw(st.integers(0, 3)):
        messages.insert(0, pb.StreamRequest(config=pb.StreamConfig(
            model=draw(st.sampled_from(MODELS)), sample_rate_hz=draw(st.sampled_from([0, 8000, 16000]) | rates),
            report_every_ms=draw(st.sampled_from([0, 100]) | uint32), top_k=draw(st.integers(0, 4)))))
    return messages


parameter_keys = st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "sample_rate_hz", "priority",
                                  "timeout", "binary_data_output", ""]) | st.text(max_size=12)


@st.composite
def parameters(draw) -> kpb.InferParameter:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "unset"]))
    if kind == "bool":
        return kpb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return kpb.InferParameter(int64_param=draw(st.sampled_from([0, 1, 7, 16000, -1, 2**63 - 1, -(2**63)])
                                                   | st.integers(-(2**63), 2**63 - 1)))
    if kind == "string":
        return kpb.InferParameter(string_param=draw(st.sampled_from(["", "user-1", "x" * 300]) | st.text(max_size=20)))
    if kind == "double":
        return kpb.InferParameter(double_param=draw(st.floats() | st.sampled_from([16000.0, 0.5, -1.0])))
    if kind == "uint64":
        return kpb.InferParameter(uint64_param=draw(st.integers(0, 2**64 - 1)))
    return kpb.InferParameter()


CONTENT_VALUES = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": floats32, "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=60) | texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
}
datatypes = st.sampled_from([*DTYPES, "BYTES", "BYTES", "FP32", "", "FP8", "STRING", "fp32", "INT128"])
dims = st.integers(-2, 6) | st.sampled_from([0, 1, 16000, 2**31, 2**32, 2**33, 2**62, 2**63 - 1, -(2**63)])


@st.composite
def input_tensors(draw, request: kpb.ModelInferRequest) -> None:
    tensor = request.inputs.add(name=draw(st.sampled_from(["text", "audio", "text", "input_ids", "lengths", ""])
                                          | st.text(max_size=10)),
                                datatype=draw(datatypes), shape=draw(st.lists(dims, max_size=4)))
    for key in draw(st.lists(parameter_keys, max_size=2)):
        tensor.parameters[key].CopyFrom(draw(parameters()))
    consistent = draw(st.booleans())
    if consistent:  # contents that match the shape, so decoding gets past the counts
        count = int(np.prod(tensor.shape)) if tensor.shape and all(0 <= d <= 64 for d in tensor.shape) else 1
        if not tensor.shape:
            tensor.shape.append(count)
    else:
        count = draw(st.integers(0, 5))
    field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
    if draw(st.booleans()):
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], min_size=count, max_size=count)))
    return None


@st.composite
def random_infer_requests(draw) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=draw(st.sampled_from(MODELS) | model_names),
                                    model_version=draw(versions), id=draw(st.text(max_size=8)))
    for key in draw(st.lists(parameter_keys, max_size=4)):
        request.parameters[key].CopyFrom(draw(parameters()))
    for _ in range(draw(st.integers(0, 3))):
        draw(input_tensors(request))
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=400), max_size=3)))
    for name in draw(st.lists(st.sampled_from(["label", "probabilities", "logits", ""]) | st.text(max_size=8),
                              max_size=2)):
        request.outputs.add(name=name)
    return request


@st.composite
def plausible_infer_requests(draw) -> kpb.ModelInferRequest:
    """A well-formed request for a real model (text BYTES [N], or audio FP32 [N, S], in contents
    or raw), then a few random mutations: names, datatypes, shapes, parameters, extra data."""
    model = draw(st.sampled_from(MODELS))
    request = kpb.ModelInferRequest(model_name=model, id=draw(st.sampled_from(["", "r1"])))
    raw = draw(st.booleans())
    if model == "keywords":
        rows, samples = draw(st.integers(1, 2)), draw(st.sampled_from([0, 1, 160, 1600, 16000]))
        values = draw(st.lists(floats32, min_size=1, max_size=8))
        audio = np.resize(np.array(values, np.float32), rows * samples).reshape(rows, samples)
        tensor = request.inputs.add(name="audio", datatype="FP32", shape=[rows, samples])
        if raw:
            request.raw_input_contents.append(audio.tobytes())
        else:
            tensor.contents.fp32_contents.extend(audio.reshape(-1).tolist())
    else:
        items = [t.encode("utf-8", "surrogatepass") for t in draw(st.lists(texts, min_size=1, max_size=5))]
        if draw(st.integers(0, 4)) == 0:
            items[0] = draw(st.binary(max_size=40))
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(items)])
        if raw:
            from serving.tensors import encode_bytes

            request.raw_input_contents.append(encode_bytes(items))
        else:
            tensor.contents.bytes_contents.extend(items)
    for key in draw(st.lists(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "sample_rate_hz"])
                             | parameter_keys, max_size=3)):
        request.parameters[key].CopyFrom(draw(parameters()))
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(["name", "datatype", "shape", "raw", "input", "output", "version",
                                         "tensor_parameter"]))
        if mutation == "name":
            tensor.name = draw(st.sampled_from(["text", "audio", ""]) | st.text(max_size=6))
        elif mutation == "datatype":
            tensor.datatype = draw(datatypes)
        elif mutation == "shape":
            tensor.shape[:] = draw(st.lists(dims, max_size=4))
        elif mutation == "raw":
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif mutation == "input":
            draw(input_tensors(request))
        elif mutation == "output":
            request.outputs.add(name=draw(st.sampled_from(["label", "probabilities", "x"])))
        elif mutation == "version":
            request.model_version = draw(versions)
        else:
            tensor.parameters[draw(parameter_keys)].CopyFrom(draw(parameters()))
    return request


infer_requests = st.one_of(plausible_infer_requests(), plausible_infer_requests(), random_infer_requests())


WIRE_METHODS = [TYPED + m for m in ("Classify", "GetModel", "ListModels")] + [
    KSERVE + m for m in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerReady", "ServerLive")]


# -- the fuzz tests --------------------------------------------------------------------------
@fuzz(700)
@given(request=classify_requests)
def test_typed_classify_requests(server, request):
    code, answer = server["wire"].unary(TYPED + "Classify", request.SerializeToString())
    check(code, answer, request)
    if code == grpc.StatusCode.OK:
        response = pb.ClassifyResponse.FromString(answer)
        assert len(response.results) == len(request.texts) + len(request.audio)
        assert all(abs(sum(r.probabilities) - 1) < 1e-3 for r in response.results)


@fuzz(350)
@given(messages=stream_sequences())
def test_typed_stream_request_sequences(server, messages):
    code, answer = server["wire"].stream(TYPED + "Stream", [m.SerializeToString() for m in messages])
    check(code, answer, messages)
    if code == grpc.StatusCode.OK and messages:
        assert pb.StreamResponse.FromString(answer[-1]).final


@fuzz(1000)
@given(request=infer_requests)
def test_kserve_infer_requests(server, request):
    code, answer = server["wire"].unary(KSERVE + "ModelInfer", request.SerializeToString())
    check(code, answer, request)
    if code == grpc.StatusCode.OK:
        response = kpb.ModelInferResponse.FromString(answer)
        assert len(response.raw_output_contents) == len(response.outputs) > 0


@fuzz(120)
@given(requests=st.lists(infer_requests, min_size=1, max_size=8))
def test_kserve_stream_infer_requests(server, requests):
    """Over ModelStreamInfer a failed request gets an error_message and the stream goes on."""
    code, answer = server["wire"].stream(KSERVE + "ModelStreamInfer", [r.SerializeToString() for r in requests])
    check(code, answer, requests)
    if code == grpc.StatusCode.OK:
        assert len(answer) == len(requests)
        for message in answer:
            error = kpb.ModelStreamInferResponse.FromString(message).error_message
            assert not error or error.split(":")[0] in {c.name for c in ALLOWED}, error


@fuzz(1200)
@given(method=st.sampled_from(WIRE_METHODS), payload=st.binary(max_size=300)
       | st.sampled_from([b"", b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x10"]))
def test_random_bytes_as_the_serialized_request(server, method, payload):
    check(*server["wire"].unary(method, payload), (method, payload))


@fuzz(150)
@given(payloads=st.lists(st.binary(max_size=200), max_size=5),
       method=st.sampled_from([TYPED + "Stream", KSERVE + "ModelStreamInfer"]))
def test_random_bytes_as_streamed_requests(server, method, payloads):
    check(*server["wire"].stream(method, payloads), (method, payloads))


def test_after_the_fuzzing_the_server_serves_and_its_memory_stayed_bounded(server):
    process, wire = server["process"], server["wire"]
    assert process.poll() is None, server["log"].read_text()[-3000:]
    assert wire.calls > 3000, f"only {wire.calls} calls: the fuzz tests did not all run"
    valid_requests(wire)
    time.sleep(0.5)
    growth = rss_mb(process.pid) - server["rss_warm"]
    print(f"fuzz: {wire.calls} calls; RSS {server['rss_warm']:.0f} MB after warm-up, {growth:+.1f} MB at the end")
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB (limit {RSS_GROWTH_LIMIT_MB})"
    log = server["log"].read_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
