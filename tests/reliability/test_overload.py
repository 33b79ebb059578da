"""Overload on a real server: a burst larger than the batching queue (the excess gets
RESOURCE_EXHAUSTED, the rest the right answers), KServe sequences beyond max_streams, and a
client flooding the server with keepalive pings (GOAWAY too_many_pings for it alone)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serving.grpc.client import RnnServeClient, stream_requests
from serving.grpc.generated.inference import inference_pb2 as kpb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TEXTS = [f"flight {i} was {'wonderful, thank you' if i % 3 else 'awful, lost my bags'}" for i in range(16)]


def _sample(server, name: str, **labels) -> float:
    value = server.running.dataplane.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _wait_for(condition, seconds: float = 1.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Each text's probabilities from an unloaded server with default settings."""
    with BackgroundServer(ServerSettings(models=MODELS, port=0)) as server, RnnServeClient(server.target) as client:
        return {text: np.array(r.probabilities) for text, r in zip(TEXTS, client.classify("sentiment", TEXTS),
                                                                    strict=True)}


def test_a_burst_beyond_the_queue_gets_resource_exhausted_for_the_excess_only(reference):
    """The queue holds 4 rows; a batch would take 8, so the batcher waits its full 1.5 s delay
    with the queue full: of 16 concurrent one-text requests (typed and KServe) exactly 4 are
    admitted and answered correctly, 12 are refused at once."""
    settings = ServerSettings(models=MODELS, port=0, queue_max_rows=4, batch_max_rows=8, batch_max_delay_ms=1500)
    with BackgroundServer(settings) as server:
        async def burst() -> list[tuple[str, grpc.StatusCode, object, float]]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                typed = channel.unary_unary("/rnnserve.v1.RnnServe/Classify",
                                            request_serializer=pb.ClassifyRequest.SerializeToString,
                                            response_deserializer=pb.ClassifyResponse.FromString)
                kserve = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                             request_serializer=kpb.ModelInferRequest.SerializeToString,
                                             response_deserializer=kpb.ModelInferResponse.FromString)
                await channel.channel_ready()

                async def one(index: int, text: str):
                    started = time.monotonic()
                    try:
                        if index % 2:
                            request = kpb.ModelInferRequest(model_name="sentiment")
                            request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents \
                                .append(text.encode())
                            reply = await kserve(request, timeout=30)
                            names = [o.name for o in reply.outputs]
                            probabilities = np.frombuffer(reply.raw_output_contents[names.index("probabilities")],
                                                          "<f4")
                        else:
                            reply = await typed(pb.ClassifyRequest(model="sentiment", texts=[text]), timeout=30)
                            probabilities = np.array(reply.results[0].probabilities)
                        return text, grpc.StatusCode.OK, probabilities, time.monotonic() - started
                    except grpc.aio.AioRpcError as error:
                        return text, error.code(), error.details(), time.monotonic() - started

                return await asyncio.gather(*(one(i, text) for i, text in enumerate(TEXTS)))

        results = asyncio.run(burst())
        answered = [r for r in results if r[1] == grpc.StatusCode.OK]
        refused = [r for r in results if r[1] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(answered) + len(refused) == len(TEXTS), [r[1] for r in results]
        assert len(answered) == 4, [r[1].name for r in results]
        for text, _, probabilities, _ in answered:
            np.testing.assert_allclose(probabilities, reference[text], atol=1e-4)
        for _, _, details, seconds in refused:
            assert "queue full" in details and "limit 4" in details, details
            assert seconds < 1.0, "a refused request waited instead of being refused at once"
        refused_counted = sum(_sample(server, "rnnserve_requests_total", method=method, model="sentiment",
                                      code="RESOURCE_EXHAUSTED") for method in ("Classify", "ModelInfer"))
        assert refused_counted == len(refused)
        # Once the burst is served the same server answers a normal request.
        with RnnServeClient(server.target) as client:
            again = client.classify("sentiment", [TEXTS[0]])[0]
        np.testing.assert_allclose(again.probabilities, reference[TEXTS[0]], atol=1e-4)


def _text_input(text: str) -> triton.InferInput:
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


def test_kserve_sequences_beyond_max_streams_are_resource_exhausted_and_room_comes_back():
    settings = ServerSettings(models=MODELS, port=0, max_streams=2)
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        kserve = triton.InferenceServerClient(server.target)
        for sequence_id in (1, 2):
            kserve.infer("sentiment", [_text_input("what a ")], sequence_id=sequence_id, sequence_start=True)
        assert _sample(server, "rnnserve_active_streams", model="sentiment") == 2
        with pytest.raises(InferenceServerException, match="limit 2") as raised:
            kserve.infer("sentiment", [_text_input("third")], sequence_id=3, sequence_start=True)
        assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        with pytest.raises(grpc.RpcError) as typed_refused:  # typed streams count against the same limit
            list(client.stream("sentiment", ["one more"]))
        assert typed_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Over ModelStreamInfer the refusal is an error_message and the stream goes on.
        answers: queue.Queue = queue.Queue()
        kserve.start_stream(callback=lambda result, error: answers.put((result, error)))
        kserve.async_stream_infer("sentiment", [_text_input("x")], sequence_id="s-3", sequence_start=True)
        kserve.async_stream_infer("sentiment", [_text_input("fine ")], sequence_id=1)
        (_, error), (result, ok) = answers.get(timeout=30), answers.get(timeout=30)
        kserve.stop_stream()
        assert error is not None and "RESOURCE_EXHAUSTED" in str(error) and "limit 2" in str(error)
        assert ok is None and result.as_numpy("label")[0]
        # The refused ones held nothing; the refused id was never started.
        assert _sample(server, "rnnserve_active_streams", model="sentiment") == 2
        with pytest.raises(InferenceServerException) as never_started:
            kserve.infer("sentiment", [_text_input("more")], sequence_id=3)
        assert never_started.value.status() == "StatusCode.INVALID_ARGUMENT"
        # Ending one sequence makes room for a new one, whose answer matches a unary call.
        final = kserve.infer("sentiment", [_text_input("wonderful flight")], sequence_id=1, sequence_end=True)
        unary = kserve.infer("sentiment", [_text_input("what a fine wonderful flight")])
        np.testing.assert_allclose(final.as_numpy("probabilities"), unary.as_numpy("probabilities"), atol=1e-4)
        _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 1)
        kserve.infer("sentiment", [_text_input("room again ")], sequence_id=3, sequence_start=True)
        kserve.infer("sentiment", [_text_input("done")], sequence_id=3, sequence_end=True)
        kserve.infer("sentiment", [_text_input("done")], sequence_id=2, sequence_end=True)
        _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0)
        kserve.close()


class _Feeder:
    """A Stream request iterator the test controls: put() chunks, close() to half-close."""

    def __init__(self, model: str):
        self.queue: queue.Queue = queue.Queue()
        self.queue.put(next(stream_requests(model, [])))

    def put(self, text: str) -> None:
        self.queue.put(list(stream_requests("", [text]))[1])

    def close(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


AGGRESSIVE_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10), ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", 10),
]


def test_the_keepalive_settings_reach_the_grpc_server_options():
    options = dict(ServerSettings(keepalive_time_s=1.5, keepalive_timeout_s=0.25, keepalive_min_ping_interval_s=3,
                                  keepalive_max_ping_strikes=0).grpc_options())
    assert options["grpc.keepalive_time_ms"] == 1500 and options["grpc.keepalive_timeout_ms"] == 250
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 3000
    assert options["grpc.http2.max_ping_strikes"] == 0 and options["grpc.keepalive_permit_without_calls"] == 0
    defaults = dict(ServerSettings().grpc_options())
    assert defaults["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert defaults["grpc.http2.max_ping_strikes"] == 2


def test_a_client_flooding_keepalive_pings_is_sent_away_and_others_keep_working(reference):
    """Default settings: a client pinging every few ms (with a stream open, so pings are not
    simply ignored as idle) collects strikes and gets GOAWAY ENHANCE_YOUR_CALM too_many_pings:
    its stream ends UNAVAILABLE and its state is freed. A well-behaved client with a stream open
    on its own connection at the same time is not touched."""
    with BackgroundServer(ServerSettings(models=MODELS, port=0)) as server:
        polite_channel = grpc.insecure_channel(server.target)
        polite = _Feeder("sentiment")
        polite_call = rnnserve_pb2_grpc.RnnServeStub(polite_channel).Stream(iter(polite))
        polite.put("flight 1 was ")
        assert next(polite_call).tokens > 0

        abusive_channel = grpc.insecure_channel(server.target, options=AGGRESSIVE_KEEPALIVE)
        abusive = _Feeder("sentiment")
        abusive_call = rnnserve_pb2_grpc.RnnServeStub(abusive_channel).Stream(iter(abusive))
        abusive.put("hello ")
        assert next(abusive_call).tokens > 0
        assert _sample(server, "rnnserve_active_streams", model="sentiment") == 2

        outcome: dict = {}

        def wait_for_the_end():
            started = time.monotonic()
            try:
                next(abusive_call)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcome["code"], outcome["details"] = error.code(), error.details()
            outcome["seconds"] = time.monotonic() - started

        waiter = threading.Thread(target=wait_for_the_end)
        waiter.start()
        waiter.join(timeout=20)
        assert not waiter.is_alive(), "the server tolerated a ping flood for 20 s"
        assert outcome["code"] == grpc.StatusCode.UNAVAILABLE, outcome
        assert "too many pings" in outcome["details"].lower(), outcome
        _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 1)
        assert _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="cancelled") == 1
        abusive.close()
        abusive_channel.close()

        # The polite stream lived through it and finishes with the right answer.
        polite.put("wonderful, thank you")
        polite.close()
        final = list(polite_call)[-1]
        assert final.final
        np.testing.assert_allclose(final.running.probabilities, reference[TEXTS[1]], atol=1e-4)
        with RnnServeClient(server.target) as client:
            assert client.classify("sentiment", [TEXTS[2]])[0].label
        polite_channel.close()
