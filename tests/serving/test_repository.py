"""The repository loader on real files: the bundled repository, broken and hostile versions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from serving.dataplane import DataPlane
from serving.errors import ModelNotReady
from serving.repository import load_repository

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_repository_serves_sentiment():
    entries = load_repository(ROOT / "models")
    assert entries["sentiment"].ready, entries["sentiment"].reason
    model, predictions = DataPlane(entries).classify_texts("sentiment", "", ["what a wonderful flight"])
    assert model.card.labels == ["negative", "neutral", "positive"]
    assert predictions[0].label in model.card.labels
    assert abs(float(predictions[0].probabilities.sum()) - 1.0) < 1e-5


def _copy_version(model_repository: Path, target: Path, name: str = "sentiment") -> Path:
    folder = target / name / "1"
    shutil.copytree(model_repository / "sentiment" / "1", folder)
    return folder


def test_truncated_model_is_not_ready_and_others_serve(model_repository, tmp_path):
    _copy_version(model_repository, tmp_path, "good")
    broken = _copy_version(model_repository, tmp_path, "broken")
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])
    entries = load_repository(tmp_path)
    assert entries["good"].ready
    assert not entries["broken"].ready and "broken/1/model.onnx" in entries["broken"].reason
    # Clients read the reason: it names files inside the repository, not where the repository is.
    assert str(tmp_path) not in entries["broken"].reason
    with pytest.raises(ModelNotReady, match="broken") as refused:
        DataPlane(entries).classify_texts("broken", "", ["hello"])
    assert str(tmp_path) not in str(refused.value)


def test_card_that_disagrees_with_the_graph_is_refused(model_repository, tmp_path):
    folder = _copy_version(model_repository, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["labels"].append("surprised")
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path)["sentiment"]
    assert not entry.ready and "4 labels but the graph outputs 3 classes" in entry.reason


def test_invalid_card_names_the_field(model_repository, tmp_path):
    folder = _copy_version(model_repository, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    del card["preprocessing"]
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path)["sentiment"]
    assert not entry.ready and "model.json: preprocessing" in entry.reason


def test_symlinked_and_hard_linked_files_are_refused(model_repository, tmp_path):
    linked = _copy_version(model_repository, tmp_path, "linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(model_repository / "sentiment" / "1" / "model.onnx")
    hard = _copy_version(model_repository, tmp_path, "hard")
    os.link(hard / "model.onnx", tmp_path / "elsewhere.onnx")
    entries = load_repository(tmp_path)
    assert "symbolic links are refused" in entries["linked"].reason
    assert "more than one hard link" in entries["hard"].reason


def test_plain_onnx_model_without_card_loads_as_tensor_model(model_repository, tmp_path):
    folder = tmp_path / "plain" / "3"
    folder.mkdir(parents=True)
    shutil.copy(model_repository / "sentiment" / "1" / "model.onnx", folder / "model.onnx")
    entry = load_repository(tmp_path)["plain"]
    assert entry.ready and entry.versions["3"].task == "tensor"


def test_latest_version_is_served_by_default(model_repository, tmp_path):
    _copy_version(model_repository, tmp_path)
    shutil.copytree(tmp_path / "sentiment" / "1", tmp_path / "sentiment" / "10")
    shutil.copytree(tmp_path / "sentiment" / "1", tmp_path / "sentiment" / "2")
    plane = DataPlane(load_repository(tmp_path))
    assert plane.model("sentiment").version == "10"
    assert plane.model("sentiment", "2").version == "2"


def _tiny_external_model(folder: Path, location: str, data_file: Path | None = None) -> None:
    """A plain y = x + w model whose weight lives in an external data file at `location`."""
    import numpy as np
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    weight.ClearField("float_data")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(np.arange(4, dtype=np.float32).tobytes())


def test_external_data_inside_the_folder_loads_and_is_read_by_the_loader(tmp_path, monkeypatch):
    import numpy as np

    folder = tmp_path / "repo" / "tiny" / "1"
    _tiny_external_model(folder, "weights/w.bin", folder / "weights" / "w.bin")
    # ONNX Runtime never resolves paths itself: run from another directory.
    monkeypatch.chdir(tmp_path)
    version = load_repository(tmp_path / "repo")["tiny"].versions["1"]
    (y,) = version.session.run({"x": np.ones((1, 4), np.float32)})
    np.testing.assert_array_equal(y, [[1, 2, 3, 4]])


@pytest.mark.parametrize("location, problem", [
    ("/etc/passwd", "is absolute"),
    ("../secret.bin", "leaves the model folder"),
    ("a/../../secret.bin", "leaves the model folder"),
    ("C:\\weights.bin", "is absolute"),
    ("link/w.bin", "symbolic link"),
    ("hard.bin", "more than one hard link"),
    ("missing.bin", "is missing"),
])
def test_hostile_external_data_is_refused_without_reading_outside(tmp_path, location, problem):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 16)
    repo = tmp_path / "repo"
    folder = repo / "hostile" / "1"
    _tiny_external_model(folder, location)
    (folder / "link").symlink_to(tmp_path)
    os.link(outside, folder / "hard.bin")
    _tiny_external_model(repo / "fine" / "1", "w.bin", repo / "fine" / "1" / "w.bin")
    entries = load_repository(repo)
    assert entries["fine"].ready
    assert not entries["hostile"].ready
    assert problem in entries["hostile"].reason and "model.onnx" in entries["hostile"].reason


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff" * 10, b"\x08\x07"])
def test_non_onnx_bytes_are_refused_and_others_serve(model_repository, tmp_path, content):
    _copy_version(model_repository, tmp_path, "good")
    (tmp_path / "junk" / "1").mkdir(parents=True)
    (tmp_path / "junk" / "1" / "model.onnx").write_bytes(content)
    entries = load_repository(tmp_path)
    assert entries["good"].ready
    assert not entries["junk"].ready and "not an ONNX model" in entries["junk"].reason


@pytest.mark.parametrize("field, value", [
    (("preprocessing", "tokenizer_file"), "../../tokenizer.json"),
    (("preprocessing", "tokenizer_file"), "/etc/passwd"),
    (("streaming", "graph"), "../step.onnx"),
])
def test_card_file_names_cannot_leave_the_folder(model_repository, tmp_path, field, value):
    folder = _copy_version(model_repository, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card[field[0]][field[1]] = value
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path)["sentiment"]
    assert not entry.ready and "not a plain file name" in entry.reason


def test_streaming_version_loads_its_step_graph_and_a_mismatched_one_is_refused(model_repository, tmp_path):
    folder = _copy_version(model_repository, tmp_path)
    version = load_repository(tmp_path)["sentiment"].versions["1"]
    assert version.streaming and {s.name for s in version.card.streaming.state} >= {"state_h", "state_c"}
    card = json.loads((folder / "model.json").read_text())
    card["streaming"]["state"][0]["output"] = "nowhere"
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path)["sentiment"]
    assert not entry.ready and "state_h -> nowhere" in entry.reason
