"""Execution-provider choice and session options, on whatever onnxruntime this host has."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from pydantic import ValidationError

from serving.dataplane import DataPlane
from serving.errors import ModelLoadError
from serving.repository import load_repository
from serving.runtime import GRAPH_OPTIMIZATION, RuntimeOptions, cuda_unavailable, resolve_providers
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_cpu_is_cpu():
    assert resolve_providers("cpu") == ("CPUExecutionProvider",)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime offers CUDA: the fallback is not reachable")
def test_auto_falls_back_to_cpu_and_says_why(caplog):
    reason = cuda_unavailable(0)
    assert reason is not None and "CUDAExecutionProvider" in reason
    with caplog.at_level(logging.INFO, logger="serving.runtime"):
        assert resolve_providers("auto") == ("CPUExecutionProvider",)
    assert "device auto: using CPUExecutionProvider" in caplog.text and reason in caplog.text


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime offers CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_explicit_cuda_without_it_is_a_clear_error(device):
    with pytest.raises(ModelLoadError, match=rf"--device {device}: .*no CUDAExecutionProvider.*rnnserve\[gpu\]"):
        resolve_providers(device)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu")
def test_auto_takes_a_cuda_device_that_answers():
    assert cuda_unavailable(0) is None
    assert resolve_providers("auto")[0][0] == "CUDAExecutionProvider"
    assert "does not answer" in cuda_unavailable(999) or "fell back" in cuda_unavailable(999)


def test_settings_carry_session_options():
    settings = ServerSettings(device="cpu", intra_op_threads=1, graph_optimization="basic")
    options = settings.runtime_options().session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(ValueError, match="graph_optimization"):
        ServerSettings(graph_optimization="max")


def test_pool_threads_sleep_between_calls_unless_told_to_spin():
    quiet = ServerSettings(device="cpu").runtime_options()
    assert quiet.session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = ServerSettings(device="cpu", intra_op_spinning="true").runtime_options()
    assert spinning.session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_stream_step_graphs_get_one_thread_unless_set():
    from serving.repository import load_version

    folder = ROOT / "models" / "sentiment" / "1"
    default = load_version("sentiment", folder, ServerSettings(device="cpu", instances=2).runtime_options())
    assert default.step_session._session.get_session_options().intra_op_num_threads == 1
    # Stream steps: one session unless asked for more (their Python work holds the GIL).
    assert len(default.sessions) == 2 and len(default.step_sessions) == 1
    every = load_version("sentiment", folder, ServerSettings(device="cpu", instances=2, stream_instances=0)
                         .runtime_options())
    assert len(every.sessions) == len(every.step_sessions) == 2
    three = load_version("sentiment", folder, ServerSettings(device="cpu", instances=1, stream_instances=3)
                         .runtime_options())
    assert len(three.sessions) == 1 and len(three.step_sessions) == 3
    # One instance gets every core as threads for the batch graph; its step graph still one.
    single = load_version("sentiment", folder, ServerSettings(device="cpu", instances=1).runtime_options())
    assert single.step_session._session.get_session_options().intra_op_num_threads == 1
    chosen = load_version("sentiment", folder, ServerSettings(device="cpu", intra_op_threads=2).runtime_options())
    assert chosen.step_session._session.get_session_options().intra_op_num_threads == 2
    assert chosen.session._session.get_session_options().intra_op_num_threads == 2


def test_instances_and_threads_default_from_the_cores():
    from serving.runtime import instance_defaults

    # CPU: one instance per core, one thread each, at most 8 instances.
    assert instance_defaults(2, on_gpu=False) == (2, 1)
    assert instance_defaults(1, on_gpu=False) == (1, 1)
    assert instance_defaults(16, on_gpu=False) == (8, 2)
    # One of the two given: the other fills the cores.
    assert instance_defaults(4, on_gpu=False, intra_op_threads=2) == (2, 2)
    assert instance_defaults(4, on_gpu=False, instances=1) == (1, 4)
    assert instance_defaults(2, on_gpu=False, instances=3, intra_op_threads=1) == (3, 1)
    # GPU: one instance, ONNX Runtime's own threads.
    assert instance_defaults(16, on_gpu=True) == (1, 0)
    # Workers share the cores.
    from serving.runtime import available_cores

    half = ServerSettings(device="cpu", workers=2).runtime_options()
    assert (half.instances, half.intra_op_threads) == instance_defaults(max(1, available_cores() // 2), False)


def test_a_model_can_have_its_own_instances_and_threads(caplog):
    settings = ServerSettings(device="cpu", instances=1, model_settings={"sentiment": {"instances": 3},
                                                                          "absent": {"intra_op_threads": 2}})
    runtime = settings.runtime_options()
    entries = load_repository(ROOT / "models", runtime, only={"sentiment", "topic"},
                              per_model=settings.model_runtime_options(runtime))
    assert len(entries["sentiment"].versions["1"].sessions) == 3
    assert len(entries["topic"].versions["1"].sessions) == 1
    assert "settings for model absent: the repository has no such model" in caplog.text


@pytest.mark.parametrize(("field", "value", "limit"), [
    ("instances", -1, "greater than or equal to 0"), ("instances", 65, "less than or equal to 64"),
    ("workers", 0, "greater than or equal to 1"), ("workers", 65, "less than or equal to 64"),
])
def test_instances_and_workers_out_of_range_are_refused(field, value, limit):
    with pytest.raises(ValidationError, match=limit):
        ServerSettings(**{field: value})
    with pytest.raises(ValidationError, match="extra"):
        ServerSettings(model_settings={"sentiment": {"instance": 2}})


def test_every_optimization_level_gives_the_same_predictions():
    texts = ["what a wonderful flight", "the worst delay ever, lost my bag", "ok", "meh " * 40]
    results = {}
    for level in GRAPH_OPTIMIZATION:
        plane = DataPlane(load_repository(ROOT / "models", RuntimeOptions(graph_optimization=level)), batching=None)
        _, predictions = plane.classify_texts("sentiment", "", texts)
        results[level] = np.stack([p.probabilities for p in predictions])
        plane.close()
    for level, probabilities in results.items():
        np.testing.assert_allclose(probabilities, results["all"], atol=1e-5, err_msg=level)
