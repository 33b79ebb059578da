"""Access: bearer tokens on every RPC and stream of a real server, loopback-only default bind (the
settings and the `rnnserve serve` command), no RPC that takes a file path, and checkpoints that
cannot run code when loaded.

Covered elsewhere: the typed API refusing a missing or wrong token on a unary call, KServe
refusing a missing token on unary calls and on ModelStreamInfer, health staying open
(tests/serving/grpc/test_auth.py); mutual TLS refusing a client without a certificate and TLS
refusing plaintext (tests/serving/grpc/test_tls.py::test_mutual_tls_needs_a_client_certificate).
"""

from __future__ import annotations

import ast
import json
import pathlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "reliability-token"
RIGHT = (("authorization", f"Bearer {TOKEN}"),)
WRONG_TOKENS = {
    "missing": (),
    "wrong": (("authorization", "Bearer not-the-token"),),
    "no-bearer-prefix": (("authorization", TOKEN),),
    "lower-case-scheme": (("authorization", f"bearer {TOKEN}"),),
    "other-header": (("x-api-key", TOKEN),),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repository")
    for name in ("sentiment", "keywords"):
        shutil.copytree(ROOT / "models" / name / "1", folder / name / "1",
                        ignore=shutil.ignore_patterns("*.int8.onnx"))
    return folder


@pytest.fixture(scope="module")
def server(repository):
    with BackgroundServer(ServerSettings(models=repository, port=0, auth_token=TOKEN)) as running:
        yield running


def _served_files(target: str, metadata=RIGHT) -> tuple[list[str], descriptor_pool.DescriptorPool]:
    """The services a server lists through reflection and a pool of the files defining them."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 metadata=metadata, timeout=10))
        services = [s.name for s in listing[0].list_services_response.service]
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in services]
        replies = list(stub.ServerReflectionInfo(iter(requests), metadata=metadata, timeout=10))
    pool, added = descriptor_pool.DescriptorPool(), set()
    files = {}
    for reply in replies:
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto

    def add(name: str) -> None:
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return services, pool


def _methods(target: str):
    services, pool = _served_files(target)
    for service_name in services:
        for method in pool.FindServiceByName(service_name).methods:
            yield service_name, method


def _call(channel: grpc.Channel, service: str, method, metadata) -> grpc.StatusCode:
    """One call of `method` with a default request (one message for streams); its status code."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service}/{method.name}"
    codec = {"request_serializer": request_class.SerializeToString,
             "response_deserializer": response_class.FromString}
    try:
        if method.client_streaming or method.server_streaming:
            call = channel.stream_stream(path, **codec) if method.client_streaming else \
                channel.unary_stream(path, **codec)
            argument = iter([request_class()]) if method.client_streaming else request_class()
            for _ in call(argument, metadata=metadata, timeout=5):
                break
        else:
            channel.unary_unary(path, **codec)(request_class(), metadata=metadata, timeout=5)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- token auth ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", list(WRONG_TOKENS))
def test_every_rpc_but_health_refuses_a_bad_token_before_any_work(server, how):
    methods = list(_methods(server.target))
    assert {s for s, _ in methods} >= {"rnnserve.v1.RnnServe", "inference.GRPCInferenceService",
                                       "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    with grpc.insecure_channel(server.target) as channel:
        for service, method in methods:
            code = _call(channel, service, method, WRONG_TOKENS[how])
            if service == "grpc.health.v1.Health":
                # open: Check answers, Watch streams (the deadline ends it), List is unimplemented upstream
                assert code != grpc.StatusCode.UNAUTHENTICATED, (method.name, code)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (service, method.name, code)
    assert not server.running.dataplane.streams.live  # no stream or sequence opened by a refused call


def test_the_right_token_opens_every_surface(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        assert stub.Classify(pb.ClassifyRequest(model="sentiment", texts=["fine"]), metadata=RIGHT, timeout=30).results
        requests = [pb.StreamRequest(config=pb.StreamConfig(model="sentiment")),
                    pb.StreamRequest(chunk=pb.StreamChunk(text="a fine day"))]
        assert list(stub.Stream(iter(requests), metadata=RIGHT, timeout=30))[-1].final
    client = triton.InferenceServerClient(url=server.target)
    headers = dict(RIGHT)
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"a fine "], dtype=object))
    assert client.infer("sentiment", [text], headers=headers).as_numpy("label")[0]
    assert client.infer("sentiment", [text], headers=headers, sequence_id=9, sequence_start=True,
                        sequence_end=True).as_numpy("label")[0]
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
    client.async_stream_infer("sentiment", [text])
    result, error = results.get(timeout=30)
    client.stop_stream()
    client.close()
    assert error is None and result.as_numpy("label")[0]


@pytest.mark.parametrize("how", ["wrong", "no-bearer-prefix"])
def test_typed_stream_and_kserve_sequences_refuse_a_wrong_token(server, how):
    headers = dict(WRONG_TOKENS[how])
    with grpc.insecure_channel(server.target) as channel:
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        requests = [pb.StreamRequest(config=pb.StreamConfig(model="sentiment")),
                    pb.StreamRequest(chunk=pb.StreamChunk(text="hello"))]
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Stream(iter(requests), metadata=WRONG_TOKENS[how], timeout=10))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: wrong token" in raised.value.details()
    client = triton.InferenceServerClient(url=server.target)
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello "], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        client.infer("sentiment", [text], headers=headers, sequence_id=11, sequence_start=True)
    assert "UNAUTHENTICATED" in str(error.value.status())
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
    try:
        client.async_stream_infer("sentiment", [text], sequence_id=12, sequence_start=True)
    except InferenceServerException:
        pass  # the server may close the refused stream before the request goes out
    result, failure = results.get(timeout=30)
    client.stop_stream()
    client.close()
    assert result is None and "UNAUTHENTICATED" in str(failure)
    assert not server.running.dataplane.streams.live and not server.running.dataplane.streams.sequences


# -- no RPC takes a file path --------------------------------------------------------------------

PATH_LIKE = re.compile(r"path|file|dir|folder|location|uri|url", re.IGNORECASE)
# Reflection's own fields name .proto files and symbols of the server's descriptor pool, not files on
# disk; test_reflection_file_names_are_not_paths checks that they do not reach the filesystem.
REFLECTION_NAMES = {"file_by_filename", "file_containing_symbol", "file_containing_extension",
                    "all_extension_numbers_of_type", "containing_type"}


def _fields(descriptor, seen: set) -> list[tuple[str, FieldDescriptor]]:
    if descriptor.full_name in seen:
        return []
    seen.add(descriptor.full_name)
    found = []
    for field in descriptor.fields:
        found.append((f"{descriptor.full_name}.{field.name}", field))
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            found += _fields(field.message_type, seen)
    return found


def test_no_request_field_of_any_served_method_is_a_file_path(server):
    checked = 0
    for service, method in _methods(server.target):
        for name, field in _fields(method.input_type, set()):
            checked += 1
            if not PATH_LIKE.search(field.name):
                continue
            if service == "grpc.reflection.v1alpha.ServerReflection" and field.name in REFLECTION_NAMES:
                continue
            # AudioClip.file carries the encoded file's bytes, never a name.
            assert field.type == FieldDescriptor.TYPE_BYTES, f"{service}/{method.name}: {name} looks like a path"
    assert checked > 30


def test_reflection_file_names_are_not_paths(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        for name in ("/etc/passwd", "../../../../etc/hostname", str(ROOT / "protos" / "inference" / "inference.proto")):
            request = reflection_pb2.ServerReflectionRequest(file_by_filename=name)
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), metadata=RIGHT, timeout=10))
            assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], name
            assert not reply.file_descriptor_response.file_descriptor_proto


def test_model_names_are_looked_up_not_opened(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        for name in ("../sentiment", "/etc/passwd", "sentiment/../keywords", str(ROOT / "models" / "sentiment")):
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetModel(pb.GetModelRequest(name=name), metadata=RIGHT, timeout=5)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, name
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetModel(pb.GetModelRequest(name="sentiment", version="../1"), metadata=RIGHT, timeout=5)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# -- default bind: loopback only -----------------------------------------------------------------

def _other_addresses() -> list[str]:
    try:
        output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in output.split() if not a.startswith("127.") and a != "::1" and not a.startswith("fe80")]


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def test_the_default_bind_is_loopback_only(repository):
    assert ServerSettings().host == "127.0.0.1"
    addresses = _other_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to try")
    with BackgroundServer(ServerSettings(models=repository, port=0)) as local:
        assert _reachable("127.0.0.1", local.port)
        assert not any(_reachable(address, local.port) for address in addresses), addresses
    # the check itself can fail: a server told to bind everywhere is reachable there
    with BackgroundServer(ServerSettings(models=repository, port=0, host="0.0.0.0")) as everywhere:
        assert _reachable(addresses[0], everywhere.port) or ":" in addresses[0]


def test_rnnserve_serve_binds_loopback_by_default(repository, tmp_path):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--models", str(repository),
                                    "--port", "0"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"serving .* on (\S+):(\d+)", log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        assert _reachable("127.0.0.1", port)
        assert not any(_reachable(address, port) for address in _other_addresses())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


# -- checkpoints cannot run code -----------------------------------------------------------------

class _WritesAMarker:
    """Unpickling this object would write the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "code ran while loading a checkpoint"))


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder as training writes it (run.json + checkpoint.pt of a real, small RNNClassifier);
    the session's quick_run takes a minute and more to train, this takes milliseconds, and loading it
    goes through the same code."""
    import torch

    from training.models.classifier import ClassifierConfig, RNNClassifier

    config = ClassifierConfig(num_classes=3, vocab_size=64, embedding_dim=8, hidden_size=8)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"model_config": asdict(config), "labels": ["a", "b", "c"]}))
    torch.save(RNNClassifier(config).state_dict(), folder / "checkpoint.pt")
    return folder


def test_a_checkpoint_that_would_run_code_is_refused(run_folder, tmp_path, capsys):
    import torch

    from training.cli import main as training_main
    from training.export import ExportError, export_run, load_run

    _, model = load_run(run_folder)  # the honest checkpoint loads through the same function
    assert sum(p.numel() for p in model.parameters()) > 0

    marker = tmp_path / "marker"
    state = torch.load(run_folder / "checkpoint.pt", weights_only=True)
    state["evil"] = _WritesAMarker(marker)
    torch.save(state, run_folder / "checkpoint.pt")

    with pytest.raises(ExportError, match=r"checkpoint\.pt: refused, it holds more than tensors") as raised:
        export_run(run_folder, tmp_path / "models", name="evil")
    assert "weights_only=True" in str(raised.value) and "Unsupported global" in str(raised.value)
    assert not marker.exists()
    assert not (tmp_path / "models" / "evil").exists()

    assert training_main(["export", str(run_folder), "--name", "evil", "--models", str(tmp_path / "models")]) == 1
    assert "error: export failed:" in capsys.readouterr().err and not marker.exists()


def test_every_torch_load_reads_weights_only():
    """No torch.load in training/, serving/ or benchmarks/ may unpickle arbitrary objects."""
    calls = 0
    for folder in ("training", "serving", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    calls += 1
                    keywords = {k.arg: k.value for k in node.keywords}
                    value = keywords.get("weights_only")
                    assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"
                if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") \
                        and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "cloudpickle", "dill"):
                    raise AssertionError(f"{path}:{node.lineno}: {node.value.id}.{node.attr} unpickles code")
    assert calls >= 1
