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
    entries = load_repository(ROOT / "models", device="cpu")
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
    entries = load_repository(tmp_path, device="cpu")
    assert entries["good"].ready
    assert not entries["broken"].ready and "model.onnx" in entries["broken"].reason
    with pytest.raises(ModelNotReady, match="broken"):
        DataPlane(entries).classify_texts("broken", "", ["hello"])


def test_card_that_disagrees_with_the_graph_is_refused(model_repository, tmp_path):
    folder = _copy_version(model_repository, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["labels"].append("surprised")
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path, device="cpu")["sentiment"]
    assert not entry.ready and "4 labels but the graph outputs 3 classes" in entry.reason


def test_invalid_card_names_the_field(model_repository, tmp_path):
    folder = _copy_version(model_repository, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    del card["preprocessing"]
    (folder / "model.json").write_text(json.dumps(card))
    entry = load_repository(tmp_path, device="cpu")["sentiment"]
    assert not entry.ready and "model.json: preprocessing" in entry.reason


def test_symlinked_and_hard_linked_files_are_refused(model_repository, tmp_path):
    linked = _copy_version(model_repository, tmp_path, "linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(model_repository / "sentiment" / "1" / "model.onnx")
    hard = _copy_version(model_repository, tmp_path, "hard")
    os.link(hard / "model.onnx", tmp_path / "elsewhere.onnx")
    entries = load_repository(tmp_path, device="cpu")
    assert "symbolic links are refused" in entries["linked"].reason
    assert "more than one hard link" in entries["hard"].reason


def test_plain_onnx_model_without_card_loads_as_tensor_model(model_repository, tmp_path):
    folder = tmp_path / "plain" / "3"
    folder.mkdir(parents=True)
    shutil.copy(model_repository / "sentiment" / "1" / "model.onnx", folder / "model.onnx")
    entry = load_repository(tmp_path, device="cpu")["plain"]
    assert entry.ready and entry.versions["3"].task == "tensor"


def test_latest_version_is_served_by_default(model_repository, tmp_path):
    _copy_version(model_repository, tmp_path)
    shutil.copytree(tmp_path / "sentiment" / "1", tmp_path / "sentiment" / "10")
    shutil.copytree(tmp_path / "sentiment" / "1", tmp_path / "sentiment" / "2")
    plane = DataPlane(load_repository(tmp_path, device="cpu"))
    assert plane.model("sentiment").version == "10"
    assert plane.model("sentiment", "2").version == "2"
