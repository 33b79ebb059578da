"""Broken models beside good ones in a real repository, served by a real server on port 0: the good
ones serve, each broken one is reported not ready everywhere (typed ListModels with the reason,
GetModel / Classify / Stream UNAVAILABLE, KServe ModelReady false and ModelMetadata / ModelInfer /
sequences UNAVAILABLE, per-model health NOT_SERVING), as DESIGN.md's "model not ready: UNAVAILABLE"
says. An unknown model stays NOT_FOUND.

Covered elsewhere: SIGTERM with requests in flight (health NOT_SERVING at once, in-flight work
finishes, new calls refused, exit 0) is tests/test_serve_cli.py::
test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones; the loader alone on truncated
and non-ONNX files is tests/serving/test_repository.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.grpc.generated.inference import inference_pb2 as kpb
from serving.grpc.generated.inference import inference_pb2_grpc
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
FILES = ("model.onnx", "step.onnx", "model.json", "tokenizer.json")


def _copy(source: str, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in FILES:
        if (ROOT / "models" / source / "1" / name).exists():
            shutil.copy(ROOT / "models" / source / "1" / name, target / name)
    return target


def _edit_card(folder: Path, edit) -> None:
    card = json.loads((folder / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))


# broken model -> a fragment its reason must hold
BROKEN = {
    "truncated": "model.onnx: not an ONNX model",
    "truncated_step": "step.onnx: not an ONNX model",
    "wrong_io": "do not match the graph's",
    "bad_json": "model.json: not valid JSON",
    "bad_field": "model.json: lables: Extra inputs are not permitted",
    "wrong_type": "model.json: labels",
    "version_is_a_file": "model.json: cannot be read",
    "no_version": "no version folder",
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repository")
    _copy("sentiment", repo / "sentiment" / "1")
    _copy("keywords", repo / "keywords" / "1")

    folder = _copy("sentiment", repo / "truncated" / "1")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])

    folder = _copy("keywords", repo / "truncated_step" / "1")
    data = (folder / "step.onnx").read_bytes()
    (folder / "step.onnx").write_bytes(data[: len(data) // 2])

    # The sentiment card (input_ids, lengths) over the keyword graph (features, lengths).
    folder = _copy("sentiment", repo / "wrong_io" / "1")
    shutil.copy(ROOT / "models" / "keywords" / "1" / "model.onnx", folder / "model.onnx")

    folder = _copy("sentiment", repo / "bad_json" / "1")
    (folder / "model.json").write_text('{"task": "text_classification", "labels": [')

    folder = _copy("sentiment", repo / "bad_field" / "1")
    _edit_card(folder, lambda card: card.update(lables=card["labels"]))

    folder = _copy("sentiment", repo / "wrong_type" / "1")
    _edit_card(folder, lambda card: card.update(labels="negative,neutral,positive"))

    (repo / "version_is_a_file").mkdir()
    (repo / "version_is_a_file" / "1").write_bytes(b"not a folder")

    (repo / "no_version" / "latest").mkdir(parents=True)

    # A good version 1 and a broken version 2: version 1 serves, version 2 is not ready.
    _copy("sentiment", repo / "mixed" / "1")
    folder = _copy("sentiment", repo / "mixed" / "2")
    (folder / "model.onnx").write_bytes(b"\x08\x07junk")
    return repo


@pytest.fixture(scope="module")
def server(repository):
    with BackgroundServer(ServerSettings(models=repository, port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.target) as channel:
        yield (rnnserve_pb2_grpc.RnnServeStub(channel), inference_pb2_grpc.GRPCInferenceServiceStub(channel),
               health_pb2_grpc.HealthStub(channel))


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def _text(name: str, text: bytes = b"a fine day", **parameters) -> kpb.ModelInferRequest:
    values = {k: kpb.InferParameter(bool_param=v) if isinstance(v, bool) else kpb.InferParameter(int64_param=v)
              for k, v in parameters.items()}
    return kpb.ModelInferRequest(model_name=name, parameters=values, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[text]))])


def test_the_good_models_serve(stubs):
    typed, kserve, health = stubs
    assert typed.Classify(pb.ClassifyRequest(model="sentiment", texts=["a fine day"]), timeout=30).results[0].label
    clip = pb.AudioClip(samples=pb.FloatSamples(values=[0.0] * 16000), sample_rate_hz=16000)
    assert typed.Classify(pb.ClassifyRequest(model="keywords", audio=[clip]), timeout=30).results[0].label
    assert kserve.ModelInfer(_text("sentiment"), timeout=30).outputs[0].name == "label"
    assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready
    for service in ("", "sentiment", "keywords", "mixed"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_model_is_not_ready_on_every_surface(stubs, name):
    typed, kserve, health = stubs
    fragment = BROKEN[name]
    summary = {m.name: m for m in typed.ListModels(pb.ListModelsRequest(), timeout=5).models}[name]
    assert not summary.ready and fragment in summary.reason, summary.reason

    for call in (
        lambda: typed.GetModel(pb.GetModelRequest(name=name), timeout=5),
        lambda: typed.Classify(pb.ClassifyRequest(model=name, texts=["a fine day"]), timeout=5),
        lambda: list(typed.Stream(iter([pb.StreamRequest(config=pb.StreamConfig(model=name))]), timeout=5)),
        lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=5),
        lambda: kserve.ModelInfer(_text(name), timeout=5),
        lambda: kserve.ModelInfer(_text(name, sequence_id=1, sequence_start=True), timeout=5),
    ):
        code, details = _code(call)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert f"model {name!r} is not ready" in details and fragment in details, details
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name=name), timeout=5).ready
    assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    # ... and the server goes on serving the good ones
    assert typed.Classify(pb.ClassifyRequest(model="sentiment", texts=["still fine"]), timeout=30).results


def test_a_broken_version_beside_a_good_one(stubs):
    typed, kserve, _ = stubs
    summary = {m.name: m for m in typed.ListModels(pb.ListModelsRequest(), timeout=5).models}["mixed"]
    assert summary.ready and list(summary.versions) == ["1"] and summary.latest_version == "1"
    reply = typed.Classify(pb.ClassifyRequest(model="mixed", texts=["a fine day"]), timeout=30)
    assert reply.version == "1"
    code, details = _code(lambda: typed.Classify(pb.ClassifyRequest(model="mixed", version="2", texts=["hi"]),
                                                 timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE and "version 2 is not ready" in details
    assert "not an ONNX model" in details
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="mixed", version="1"), timeout=5).ready
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="mixed", version="2"), timeout=5).ready
    code, _ = _code(lambda: kserve.ModelReady(kpb.ModelReadyRequest(name="mixed", version="3"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unknown_models_stay_not_found_not_unavailable(stubs):
    typed, kserve, health = stubs
    for call in (lambda: typed.GetModel(pb.GetModelRequest(name="absent"), timeout=5),
                 lambda: kserve.ModelReady(kpb.ModelReadyRequest(name="absent"), timeout=5),
                 lambda: health.Check(health_pb2.HealthCheckRequest(service="absent"), timeout=5)):
        assert _code(call)[0] == grpc.StatusCode.NOT_FOUND


def test_served_results_are_those_of_the_bundled_model(stubs):
    """The good copy really runs its graph: the same probabilities as the bundled repository."""
    from serving.dataplane import DataPlane
    from serving.repository import load_repository

    typed, _, _ = stubs
    texts = ["what a wonderful flight", "my bags were lost again"]
    served = typed.Classify(pb.ClassifyRequest(model="sentiment", texts=texts), timeout=30).results
    plane = DataPlane(load_repository(ROOT / "models", only={"sentiment"}), batching=None)
    _, expected = plane.classify_texts("sentiment", "", texts)
    plane.close()
    np.testing.assert_allclose([list(r.probabilities) for r in served], [p.probabilities for p in expected],
                               atol=1e-5)
