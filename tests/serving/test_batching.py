"""Dynamic batching: concurrent requests share ONNX Runtime calls and get exactly what they
would get alone; the queue is bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from busy_instances import busy_instances
from hypothesis import given
from hypothesis import strategies as st

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
    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=20, batch_max_rows=64, instances=1)
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


@pytest.mark.parametrize("instances", [1, 2])
def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_unrun(instances):
    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=1, batch_max_rows=64,
                              instances=instances)
    with BackgroundServer(settings) as server:
        plane = server.running.dataplane
        with busy_instances(plane, "sentiment") as batcher:
            with RnnServeClient(server.target, timeout_s=0.1) as hasty, pytest.raises(grpc.RpcError) as error:
                hasty.classify("sentiment", ["will anyone wait for me"])
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(50):
            if batcher.stats.expired:
                break
            time.sleep(0.05)
        assert batcher.stats.expired == 1 and batcher.stats.jobs == instances
        with RnnServeClient(server.target, timeout_s=10) as patient:
            assert patient.classify("sentiment", ["I can wait"])[0].label
        assert batcher.stats.jobs == instances + 1


def test_holding_for_a_fuller_batch_never_outlasts_a_queued_deadline():
    """A lone request with a deadline shorter than the batching delay is run in time, not held
    into DEADLINE_EXCEEDED; without a deadline the same request is held for company."""
    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=1500, batch_max_rows=64,
                              instances=1)
    with BackgroundServer(settings) as server, RnnServeClient(server.target, timeout_s=None) as patient:
        started = time.monotonic()
        assert patient.classify("sentiment", ["no deadline: held for the delay, then alone"])[0].label
        assert time.monotonic() - started >= 1.5
        with RnnServeClient(server.target, timeout_s=0.75) as hasty:
            assert hasty.classify("sentiment", ["no time to wait for others"])[0].label
        batcher = server.running.dataplane.batcher(server.running.dataplane.model("sentiment"))
        assert batcher.stats.expired == 0 and batcher.stats.jobs == 2


def test_two_instances_compute_at_the_same_time():
    """Each instance is a thread of its own: both runners must be inside a call at once to pass
    the barrier (one instance at a time would time it out)."""
    meeting = threading.Barrier(2, timeout=30)

    def runner(payloads):
        meeting.wait()
        return payloads

    batcher = Batcher("test", [runner, runner], max_batch_rows=1, max_delay_s=0.0)
    try:
        futures = [batcher.submit(index, 1) for index in range(2)]
        assert sorted(f.result(60) for f in futures) == [0, 1]
        assert batcher.stats.max_concurrent == 2 and batcher.stats.calls == 2
    finally:
        batcher.close()


def test_an_idle_instance_takes_queued_work_at_once_while_another_is_busy():
    """A 60 s max delay never holds a job while another instance computes: pipelining."""
    release = threading.Event()

    def runner(payloads):
        if "slow" in payloads:
            assert release.wait(60)
        return payloads

    batcher = Batcher("test", [runner, runner], max_batch_rows=8, max_delay_s=60.0, preferred_rows=8)
    try:
        slow = batcher.submit("slow", 8)  # a preferred-size batch: taken at once
        deadline = time.monotonic() + 30
        while batcher.scheduler.busy == 0:  # the first instance took it
            assert time.monotonic() < deadline, "the first instance never took the full batch"
            threading.Event().wait(0.01)
        # One row, far below the preferred 8: only the other instance being busy lets it go now.
        quick = batcher.submit("quick", 1)
        assert quick.result(30) == "quick" and not slow.done()
        release.set()
        assert slow.result(30) == "slow"
    finally:
        release.set()
        batcher.close()


def test_an_idle_instance_holds_fewer_rows_than_preferred_while_nothing_runs():
    """With every instance idle, jobs wait (up to the 60 s delay here) until the preferred
    rows are there, and then run: on one instance, or split over the idle ones (2 + 1 here)."""
    for instances, calls in ((1, 1), (2, 2)):
        batcher = Batcher("test", [lambda payloads: payloads] * instances, max_batch_rows=8, max_delay_s=60.0,
                          preferred_rows=3)
        try:
            futures = [batcher.submit(index, 1) for index in range(2)]
            time.sleep(0.3)
            assert batcher.stats.calls == 0 and not any(f.done() for f in futures)
            futures.append(batcher.submit(2, 1))
            assert [f.result(30) for f in futures] == [0, 1, 2]
            assert batcher.stats.calls == calls and batcher.stats.rows == 3
        finally:
            batcher.close()


def test_idle_instances_split_the_queued_rows_and_run_side_by_side():
    """Rows queued while every instance is idle are shared out: 8 rows on 2 idle instances run
    as 4 + 4 at the same time (each call waits for the other at a barrier), not as one call of 8
    while the other instance waits."""
    both = threading.Barrier(2, timeout=20)
    sizes = []

    def runner(payloads):
        sizes.append(len(payloads))
        both.wait()
        return payloads

    batcher = Batcher("test", [runner, runner], max_batch_rows=16, max_delay_s=60.0, preferred_rows=8)
    try:
        futures = [batcher.submit(index, 1) for index in range(8)]
        assert [f.result(30) for f in futures] == list(range(8))
        assert sorted(sizes) == [4, 4] and batcher.stats.max_concurrent == 2
    finally:
        batcher.close()


def test_many_instances_under_64_clients_equal_unbatched_results_and_overlap():
    """64 concurrent clients on the typed API and KServe v2, two instances of real ONNX Runtime
    sessions: every answer equals the unbatched one, and the instances computed at once."""
    import tritonclient.grpc as triton

    settings = ServerSettings(models=ROOT / "models", port=0, instances=2, intra_op_threads=1,
                              batch_max_delay_ms=2, batch_max_rows=16, stream_instances=0)
    rng = np.random.default_rng(1)
    requests = [_texts(rng, int(rng.integers(1, 5))) for _ in range(64)]
    alone = DataPlane(load_repository(ROOT / "models", only={"sentiment"}), batching=None)
    expected = [np.stack([p.probabilities for p in alone.classify_texts("sentiment", "", texts)[1]])
                for texts in requests]
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        kserve = triton.InferenceServerClient(server.target)
        start = threading.Barrier(len(requests))

        def send(index):
            texts = requests[index]
            start.wait()
            if index % 2:
                return np.array([r.probabilities for r in client.classify("sentiment", texts)])
            tensor = triton.InferInput("text", [len(texts)], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
            return kserve.infer("sentiment", [tensor]).as_numpy("probabilities")

        with ThreadPoolExecutor(len(requests)) as pool:
            served = list(pool.map(send, range(len(requests))))
        # With stream_instances=0 stream steps run on the same number of instances (of step.onnx).
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"a fine day "], dtype=object))
        kserve.infer("sentiment", [tensor], sequence_id=1, sequence_start=True, sequence_end=True)
        kserve.close()
        plane = server.running.dataplane
        assert plane.metrics.registry.get_sample_value("rnnserve_instances", {"model": "sentiment/step"}) == 2
        batcher = plane.batcher(plane.model("sentiment"))
        stats = batcher.stats
        assert batcher.instances == 2
    for got, want in zip(served, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert stats.jobs == len(requests) and stats.max_concurrent == 2, stats


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(1, 5)), min_size=1, max_size=40), st.integers(1, 8))
def test_the_queue_hands_out_every_job_once_oldest_first_one_key_per_batch(jobs, max_rows):
    from serving.batching import Job, JobQueue

    queue = JobQueue("test", max_queue_rows=10_000)
    queued = [Job(index, rows, key) for index, (key, rows) in enumerate(jobs)]
    for job in queued:
        queue.put(job)
    handed = []
    while len(queue):
        oldest = queue.oldest
        batch = queue.take(max_rows)
        assert batch[0] is oldest and len({job.key for job in batch}) == 1
        assert len(batch) == 1 or sum(job.rows for job in batch) <= max_rows
        assert [job.payload for job in batch] == sorted(job.payload for job in batch)
        handed += batch
    assert sorted(job.payload for job in handed) == list(range(len(jobs))) and queue.rows == 0
