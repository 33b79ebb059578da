"""Prometheus metrics scraped over HTTP from a real server."""

from __future__ import annotations

import logging
import re
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from busy_instances import busy_instances
from tritonclient.utils import InferenceServerException

from serving.grpc.client import RnnServeClient
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]


def _value(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in the scrape")


def test_requests_errors_queue_compute_and_batch_sizes_are_exported():
    settings = ServerSettings(models=ROOT / "models", port=0, metrics_port=0)
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        client.classify("sentiment", ["great", "awful"])
        client.classify("sentiment", ["fine"])
        with pytest.raises(grpc.RpcError):
            client.classify("nope", ["x"])
        kserve = triton.InferenceServerClient(url=server.target)
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"ok"], dtype=object))
        kserve.infer("topic", [text])
        kserve.close()
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10)
        body = scrape.read().decode()
    assert _value(body, "rnnserve_requests_total", method="Classify", model="sentiment", code="OK") == 2
    # A name the repository does not have is counted under one label: clients cannot add series.
    assert _value(body, "rnnserve_requests_total", method="Classify", model="_unknown_", code="NOT_FOUND") == 1
    assert 'model="nope"' not in body
    assert _value(body, "rnnserve_model_ready", model="sentiment") == 1
    assert _value(body, "rnnserve_requests_total", method="ModelInfer", model="topic", code="OK") == 1
    assert _value(body, "rnnserve_batch_rows_sum", model="sentiment") == 3
    assert _value(body, "rnnserve_queue_seconds_count", model="sentiment") == 2
    assert _value(body, "rnnserve_compute_seconds_count", model="topic") == 1
    assert _value(body, "rnnserve_request_seconds_count", method="Classify", model="sentiment") == 2


def test_a_broken_model_reads_not_ready(tmp_path):
    shutil.copytree(ROOT / "models" / "sentiment", tmp_path / "sentiment")
    shutil.copytree(ROOT / "models" / "topic" / "1", tmp_path / "topic" / "1")  # its one version, broken
    onnx_file = tmp_path / "topic" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with BackgroundServer(ServerSettings(models=tmp_path, port=0, metrics_port=0)) as server:
        body = _scrape(server)
    assert _value(body, "rnnserve_model_ready", model="sentiment") == 1
    assert _value(body, "rnnserve_model_ready", model="topic") == 0


def test_calls_past_their_deadline_are_counted_as_such_and_log_no_error(caplog):
    # Every instance busy: a call with a 100 ms deadline gives up while it waits in the queue.
    settings = ServerSettings(models=ROOT / "models", port=0, metrics_port=0, batch_max_delay_ms=1,
                              batch_max_rows=64)
    with caplog.at_level(logging.ERROR), BackgroundServer(settings) as server:
        with busy_instances(server.running.dataplane, "sentiment"):
            with RnnServeClient(server.target, timeout_s=0.1) as client:
                with pytest.raises(grpc.RpcError) as raised:
                    client.classify("sentiment", ["late again"])
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            kserve = triton.InferenceServerClient(url=server.target)
            text = triton.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"late"], dtype=object))
            with pytest.raises(InferenceServerException, match="Deadline"):
                kserve.infer("sentiment", [text], client_timeout=0.1)
            kserve.close()
        time.sleep(0.6)  # the abandoned jobs are taken and find nobody waiting
        with RnnServeClient(server.target) as client:
            assert client.classify("sentiment", ["on time"])[0].label
        body = _scrape(server)
    assert _value(body, "rnnserve_requests_total", method="Classify", model="sentiment", code="DEADLINE_EXCEEDED") == 1
    assert _value(body, "rnnserve_requests_total", method="ModelInfer", model="sentiment",
                  code="DEADLINE_EXCEEDED") == 1
    assert _value(body, "rnnserve_requests_total", method="Classify", model="sentiment", code="OK") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def _scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10) as scrape:
        return scrape.read().decode()
