"""Dynamic batching: concurrent requests share ONNX Runtime calls and get exactly what they
would get alone; the queue is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.batching import Batcher
from serving.dataplane import BatchingConfig, DataPlane
from serving.errors import ResourceExhausted
from serving.grpc.client import RnnServeClient
from serving.grpc.server import BackgroundServer
from serving.repository import load_repository
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the flight was late again but the crew were kind and the food was awful great terrible fine".split()


def _texts(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(count)]


def test_concurrent_requests_share_calls_and_equal_unbatched_results():
    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=20, batch_max_rows=64)
    rng = np.random.default_rng(0)
    requests = [_texts(rng, int(rng.integers(1, 6))) for _ in range(40)]
    alone = DataPlane(load_repository(ROOT / "models"), batching=None)
    expected = [[p.probabilities for p in alone.classify_texts("sentiment", "", texts)[1]] for texts in requests]
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        start = threading.Barrier(len(requests))

        def send(texts):
            start.wait()
            return [list(r.probabilities) for r in client.classify("sentiment", texts)]

        with ThreadPoolExecutor(len(requests)) as pool:
            served = list(pool.map(send, requests))
        stats = server.running.dataplane.batcher(server.running.dataplane.model("sentiment")).stats
    for got, want in zip(served, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert stats.jobs == len(requests) and stats.rows == sum(len(r) for r in requests)
    assert stats.calls < len(requests) / 2, f"{stats.calls} calls for {len(requests)} requests: no batching"


def test_a_request_over_the_queue_bound_is_resource_exhausted():
    plane = DataPlane(load_repository(ROOT / "models"), BatchingConfig(max_queue_rows=2))
    try:
        with pytest.raises(ResourceExhausted, match="queue full .* limit 2"):
            plane.classify_texts("sentiment", "", ["one", "two", "three"])
        assert plane.classify_texts("sentiment", "", ["one", "two"])[1][0].label
    finally:
        plane.close()
    with BackgroundServer(ServerSettings(models=ROOT / "models", port=0, queue_max_rows=2)) as server:
        with RnnServeClient(server.target) as client, pytest.raises(grpc.RpcError) as error:
            client.classify("sentiment", ["one", "two", "three"])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.value.details()


def test_jobs_with_different_keys_never_share_a_call_and_errors_reach_every_waiter():
    calls = []

    def runner(payloads):
        calls.append(list(payloads))
        if "boom" in payloads:
            raise ValueError("boom")
        return [p.upper() for p in payloads]

    batcher = Batcher("test", runner, max_batch_rows=8, max_delay_s=0.05)
    try:
        futures = [batcher.submit("a", 1, key=1), batcher.submit("b", 1, key=2), batcher.submit("c", 1, key=1)]
        assert [f.result(5) for f in futures] == ["A", "B", "C"]
        assert sorted(map(sorted, calls)) == [["a", "c"], ["b"]]
        failing = [batcher.submit("boom", 1), batcher.submit("x", 1)]
        for future in failing:
            with pytest.raises(ValueError, match="boom"):
                future.result(5)
        assert batcher.run("ok", 1) == "OK"
    finally:
        batcher.close()


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_unrun():
    import time

    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=500, batch_max_rows=64)
    with BackgroundServer(settings) as server:
        with RnnServeClient(server.target, timeout_s=0.1) as hasty, pytest.raises(grpc.RpcError) as error:
            hasty.classify("sentiment", ["will anyone wait for me"])
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        plane = server.running.dataplane
        batcher = plane.batcher(plane.model("sentiment"))
        for _ in range(50):
            if batcher.stats.expired:
                break
            time.sleep(0.05)
        assert batcher.stats.expired == 1 and batcher.stats.jobs == 0
        with RnnServeClient(server.target, timeout_s=10) as patient:
            assert patient.classify("sentiment", ["I can wait"])[0].label
        assert batcher.stats.jobs == 1
