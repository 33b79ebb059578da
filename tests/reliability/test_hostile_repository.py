"""A hostile model repository started by a real server: every model that tries to make the loader
read outside its folder is refused (not ready, with the reason) while the others keep serving.

The files outside are FIFOs (canaries): a thread holds each one's write end open-pending, so if
anything opened one for reading, that open would complete and be recorded (and the reader would
get EOF instead of hanging). The test asserts that no canary was ever opened.

Covered by the loader alone in tests/serving/test_repository.py (and repeated here against a
server only where a case was missing): absolute, `../`, `a/../../x`, `C:\\` locations, a symlinked
folder inside the location, hard links, missing files, card file names leaving the folder.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from serving.grpc.generated.inference import inference_pb2 as kpb
from serving.grpc.generated.inference import inference_pb2_grpc
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]


def _external_model(folder: Path, location: str, offset="0", length="16", dims=(4,),
                    weights: bytes | None = None) -> None:
    """A plain y = x + w model over FP32 [batch, 4]; w lives in external data at `location`."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    if weights is not None:
        (folder / "w.bin").write_bytes(weights)


class Canaries:
    """FIFOs outside the repository; any open for reading is recorded."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.opened: list[str] = []
        self.threads: list[threading.Thread] = []

    def make(self, name: str) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)

        def watch():
            descriptor = os.open(path, os.O_WRONLY)  # returns only once a reader opened the FIFO
            if not getattr(self, "releasing", False):
                self.opened.append(str(path))
            os.close(descriptor)

        thread = threading.Thread(target=watch, daemon=True, name=f"canary-{name}")
        thread.start()
        self.threads.append(thread)
        return path

    def release(self) -> None:
        self.releasing = True
        for thread in self.threads:
            path = Path(thread.name.removeprefix("canary-"))
            reader = os.open(self.folder / path, os.O_RDONLY | os.O_NONBLOCK)
            thread.join(timeout=5)
            os.close(reader)


WEIGHTS = np.arange(4, dtype=np.float32).tobytes()

# model name -> fragment of the reason it is refused for
HOSTILE = {
    "absolute": "is absolute",
    "dotdot": "leaves the model folder",
    "nested_dotdot": "leaves the model folder",
    "symlinked_data_file": "goes through a symbolic link",
    "symlinked_data_folder": "goes through a symbolic link",
    "hard_linked_fifo": "is not a regular file",
    "hard_linked_file": "has more than one hard link",
    "fifo_inside": "is not a regular file",
    "symlinked_model_file": "model.onnx: symbolic links are refused",
    "symlinked_version_folder": "symbolic links are refused",
    "symlinked_model_folder": "symlinked_model_folder: symbolic links are refused",
    "huge_length": "shorter than declared: offset 0, length 1000000000000000, the file holds 16 bytes",
    "huge_offset": "shorter than declared",
    "negative_offset": "is negative",
    "nul_in_location": "cannot be used",
    "huge_dims": "ONNX Runtime cannot load it",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    repo, outside = base / "repo", base / "outside"
    outside.mkdir()
    canaries = Canaries(outside)

    def version(name: str) -> Path:
        return repo / name / "1"

    _external_model(version("fine"), "weights/w.bin")
    (version("fine") / "weights").mkdir()
    (version("fine") / "weights" / "w.bin").write_bytes(WEIGHTS)
    shutil.copytree(ROOT / "models" / "sentiment" / "1", version("sentiment"),
                    ignore=shutil.ignore_patterns("*.int8.onnx"))

    _external_model(version("absolute"), str(canaries.make("absolute.bin")))
    canaries.make("dotdot.bin")
    _external_model(version("dotdot"), "../../../outside/dotdot.bin")
    canaries.make("nested.bin")
    _external_model(version("nested_dotdot"), "a/../../../../outside/nested.bin")
    _external_model(version("symlinked_data_file"), "w.bin")
    (version("symlinked_data_file") / "w.bin").symlink_to(canaries.make("symlinked.bin"))
    canaries.make("folder/w.bin")
    _external_model(version("symlinked_data_folder"), "weights/w.bin")
    (version("symlinked_data_folder") / "weights").symlink_to(outside / "folder")
    _external_model(version("hard_linked_fifo"), "w.bin")
    os.link(canaries.make("hard.fifo"), version("hard_linked_fifo") / "w.bin")
    _external_model(version("hard_linked_file"), "w.bin")
    (outside / "hard.bin").write_bytes(WEIGHTS)
    os.link(outside / "hard.bin", version("hard_linked_file") / "w.bin")
    _external_model(version("fifo_inside"), "w.bin")
    os.mkfifo(version("fifo_inside") / "w.bin")  # inside, but reading it would block: refused unread

    version("symlinked_model_file").mkdir(parents=True)
    (version("symlinked_model_file") / "model.onnx").symlink_to(canaries.make("model.onnx"))
    # The version folder, then the model folder, are links to folders outside holding canaries.
    canaries.make("version/model.onnx")
    canaries.make("version/model.json")
    (repo / "symlinked_version_folder").mkdir()
    version("symlinked_version_folder").symlink_to(outside / "version")
    canaries.make("model/1/model.onnx")
    canaries.make("model/1/model.json")
    (repo / "symlinked_model_folder").symlink_to(outside / "model")

    _external_model(version("huge_length"), "w.bin", length=str(10**15), weights=WEIGHTS)
    _external_model(version("huge_offset"), "w.bin", offset=str(2**70), weights=WEIGHTS)
    _external_model(version("negative_offset"), "w.bin", offset="-8", weights=WEIGHTS)
    _external_model(version("nul_in_location"), "w\0.bin", weights=WEIGHTS)
    # 2**31 x 2**31 floats declared, 16 bytes there: refused, nothing that size allocated.
    _external_model(version("huge_dims"), "w.bin", dims=(2**31, 2**31), weights=WEIGHTS)

    try:
        with BackgroundServer(ServerSettings(models=repo, port=0)) as server:
            yield server, canaries
    finally:
        canaries.release()


@pytest.fixture(scope="module")
def stubs(setup):
    server, _ = setup
    with grpc.insecure_channel(server.target) as channel:
        yield (rnnserve_pb2_grpc.RnnServeStub(channel), inference_pb2_grpc.GRPCInferenceServiceStub(channel),
               health_pb2_grpc.HealthStub(channel))


def _x(model: str) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 4], contents=kpb.InferTensorContents(fp32_contents=[1.0] * 4))])


def test_the_other_models_serve(stubs):
    typed, kserve, health = stubs
    reply = kserve.ModelInfer(_x("fine"), timeout=30)
    assert np.frombuffer(reply.raw_output_contents[0], "<f4").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert typed.Classify(pb.ClassifyRequest(model="sentiment", texts=["a fine day"]), timeout=30).results[0].label
    for name in ("fine", "sentiment"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_model_is_refused_and_reported_not_ready(stubs, name):
    typed, kserve, health = stubs
    summary = {m.name: m for m in typed.ListModels(pb.ListModelsRequest(), timeout=5).models}[name]
    assert not summary.ready and HOSTILE[name] in summary.reason, summary.reason
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name=name), timeout=5).ready
    with pytest.raises(grpc.RpcError) as raised:
        kserve.ModelInfer(_x(name), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and HOSTILE[name] in raised.value.details()
    assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    assert kserve.ModelInfer(_x("fine"), timeout=30).outputs


def test_no_file_outside_the_repository_was_ever_opened(setup, stubs):
    _, canaries = setup
    assert len(canaries.threads) == 11 and all(t.is_alive() for t in canaries.threads)
    assert canaries.opened == []


def test_the_canaries_would_notice_a_reader(tmp_path):
    """The detector itself works: opening a canary for reading is recorded (a test that cannot fail
    is no test)."""
    canaries = Canaries(tmp_path)
    path = canaries.make("probe.bin")
    with open(path, "rb") as handle:
        assert handle.read() == b""
    canaries.threads[0].join(timeout=5)
    assert canaries.opened == [str(path)]
