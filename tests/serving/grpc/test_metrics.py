"""Prometheus metrics scraped over HTTP from a real server."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

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
    assert _value(body, "rnnserve_requests_total", method="Classify", model="nope", code="NOT_FOUND") == 1
    assert _value(body, "rnnserve_requests_total", method="ModelInfer", model="topic", code="OK") == 1
    assert _value(body, "rnnserve_batch_rows_sum", model="sentiment") == 3
    assert _value(body, "rnnserve_queue_seconds_count", model="sentiment") == 2
    assert _value(body, "rnnserve_compute_seconds_count", model="topic") == 1
    assert _value(body, "rnnserve_request_seconds_count", method="Classify", model="sentiment") == 2
