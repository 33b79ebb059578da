"""The same data, config and seed give the same tokenizer, weights and metrics."""

from __future__ import annotations

import json

import torch

from training.config import quick
from training.tasks import TASKS
from training.train import train_text_classifier


def test_training_twice_gives_identical_runs(quick_run, tmp_path):
    spec = TASKS["sentiment"]
    again = train_text_classifier(
        task="sentiment", description=spec.description, dataset=spec.load(),
        model_overrides=dict(spec.model, **spec.quick_model), config=quick(spec.train),
        runs_dir=tmp_path, command="pytest quick run", progress=False,
    )
    assert (again / "tokenizer.json").read_text() == (quick_run / "tokenizer.json").read_text()
    first = torch.load(quick_run / "checkpoint.pt", weights_only=True)
    second = torch.load(again / "checkpoint.pt", weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    metrics = [json.loads((run / "run.json").read_text())["metrics"] for run in (quick_run, again)]
    assert metrics[0] == metrics[1]
