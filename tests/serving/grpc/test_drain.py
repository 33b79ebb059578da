"""Shutting a server down with unary calls held in its batchers, on each gRPC front: the held
calls are answered, a call that arrives once the drain has begun is refused with UNAVAILABLE,
and the stop returns when the held calls are done, not at the end of the grace period."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.handlers import Drain
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]
# Each client on its own HTTP/2 connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _classify(channel: grpc.Channel, text: str) -> str:
    stub = rnnserve_pb2_grpc.RnnServeStub(channel)
    return stub.Classify(pb.ClassifyRequest(model="sentiment", texts=[text]), timeout=30).results[0].label


def test_a_drain_answers_the_held_calls_and_refuses_new_ones(front_settings):
    settings = ServerSettings(models=ROOT / "models", port=0, batch_max_delay_ms=1500, **front_settings)
    server = BackgroundServer(settings).__enter__()
    channels = [grpc.insecure_channel(server.target, options=OWN_CONNECTION) for _ in range(5)]
    try:
        with ThreadPoolExecutor(len(channels)) as pool:
            for label in pool.map(lambda channel: _classify(channel, "warm up"), channels):
                assert label in {"negative", "neutral", "positive"}
            held = [pool.submit(_classify, channel, f"flight {i} was fine") for i, channel in enumerate(channels[:4])]
            time.sleep(0.4)
            assert not any(future.done() for future in held), "the calls were not held in the batcher"
            started = time.monotonic()
            stopping = threading.Thread(target=server.stop, kwargs={"grace_s": 20.0})
            stopping.start()
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                _classify(channels[4], "too late")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert Drain.MESSAGE in refused.value.details()
            labels = [future.result(timeout=30) for future in held]
            stopping.join(timeout=30)
            stopped_after = time.monotonic() - started
        assert all(label in {"negative", "neutral", "positive"} for label in labels)
        assert not stopping.is_alive() and stopped_after < 10, f"stop took {stopped_after:.1f} s (grace 20 s)"
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def test_the_drain_waits_for_the_calls_in_flight_only():
    async def counts() -> list[bool]:
        drain = Drain()
        seen = [await drain.wait(0.01)]
        drain.enter()
        drain.enter()
        seen.append(await drain.wait(0.05))
        drain.leave()
        seen.append(await drain.wait(0.05))
        drain.leave()
        seen.append(await drain.wait(0.01))
        return seen

    assert asyncio.run(counts()) == [True, False, False, True]


def test_a_stream_open_past_the_grace_period_is_ended_with_unavailable(front_settings, caplog):
    """A stream that neither sends nor ends is given the grace period, then answered UNAVAILABLE
    saying why, on each front, with nothing logged as an unhandled error; a stream that ends
    within the grace period gets its final answer."""
    settings = ServerSettings(models=ROOT / "models", port=0, **front_settings)
    server = BackgroundServer(settings).__enter__()
    channel = grpc.insecure_channel(server.target)
    stub = rnnserve_pb2_grpc.RnnServeStub(channel)
    try:
        finishing, hanging = queue.Queue(), queue.Queue()
        for feed in (finishing, hanging):
            feed.put(pb.StreamRequest(config=pb.StreamConfig(model="sentiment")))
            feed.put(pb.StreamRequest(chunk=pb.StreamChunk(text="what a ")))
        finishing_call = stub.Stream(iter(finishing.get, None))
        hanging_call = stub.Stream(iter(hanging.get, None))
        next(finishing_call), next(hanging_call)
        caplog.set_level(logging.WARNING)
        started = time.monotonic()
        stopping = threading.Thread(target=server.stop, kwargs={"grace_s": 1.5})
        stopping.start()
        time.sleep(0.3)
        finishing.put(pb.StreamRequest(chunk=pb.StreamChunk(text="wonderful flight")))
        finishing.put(None)
        assert list(finishing_call)[-1].final
        with pytest.raises(grpc.RpcError) as ended:
            list(hanging_call)
        ended_after = time.monotonic() - started
        stopping.join(timeout=10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        assert Drain.STREAM_ENDED in ended.value.details()
        assert 1.2 < ended_after < 5, f"the open stream ended {ended_after:.1f} s after the stop (grace 1.5 s)"
        assert not stopping.is_alive()
        unhandled = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not unhandled, unhandled
    finally:
        hanging.put(None)
        channel.close()
        server.stop()
