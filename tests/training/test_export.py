"""Export: native recurrent ops, parity with PyTorch, atomic and never-overwriting versions."""

from __future__ import annotations

import json

import onnx

from serving.card import ModelCard
from training.export import export_run


def test_exported_version_is_valid_and_has_the_native_lstm(model_repository):
    folder = model_repository / "sentiment" / "1"
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert "LSTM" in {node.op_type for node in graph.node}
    assert [i.name for i in graph.input] == ["input_ids", "lengths"]
    card = ModelCard.model_validate_json((folder / "model.json").read_text())
    assert card.export.parity_max_abs_diff <= 1e-4 and card.export.parity_labels_identical
    assert card.baseline is not None and card.data.digest.startswith("sha256:")


def test_export_adds_a_new_version_and_leaves_the_old_one(quick_run, tmp_path):
    first = export_run(quick_run, tmp_path, name="sentiment", exporter="torchscript")
    before = (first / "model.onnx").read_bytes()
    second = export_run(quick_run, tmp_path, name="sentiment", exporter="torchscript")
    assert (first.name, second.name) == ("1", "2")
    assert (first / "model.onnx").read_bytes() == before
    assert not [p for p in (tmp_path / "sentiment").iterdir() if p.name.startswith(".")]


def test_gru_export_keeps_linear_before_reset(quick_run, tmp_path):
    import torch

    run = json.loads((quick_run / "run.json").read_text())
    gru_run = tmp_path / "gru-run"
    gru_run.mkdir()
    for name in ("tokenizer.json", "test.jsonl"):
        (gru_run / name).write_bytes((quick_run / name).read_bytes())
    run["model_config"]["cell"] = "gru"
    (gru_run / "run.json").write_text(json.dumps(run))
    from training.models.classifier import ClassifierConfig, RNNClassifier

    torch.manual_seed(0)
    torch.save(RNNClassifier(ClassifierConfig(**run["model_config"])).state_dict(), gru_run / "checkpoint.pt")
    folder = export_run(gru_run, tmp_path / "models", name="sentiment")
    (gru,) = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "GRU"]
    assert {a.name: a.i for a in gru.attribute}["linear_before_reset"] == 1

