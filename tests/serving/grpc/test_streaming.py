"""Streams with server-held state through a real server on port 0: the typed Stream RPC and
KServe v2 sequences (unmodified tritonclient), chunking invariance against unary calls,
concurrency, state freed on end/cancel/disconnect/idle/deadline, misuse codes, and keyword
detection on a synthesised recording with known keyword times. On each gRPC front: the native
one hands these bidirectional RPCs to the grpcio server behind it, and they must work the same."""

from __future__ import annotations

import asyncio
import queue
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serving.grpc.client import AsyncRnnServeClient, RnnServeClient
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings
from training.data.speech import Speaker, coloured_noise, split_of, synthesize

ROOT = Path(__file__).resolve().parents[3]
TEXTS = [
    "what a wonderful flight, the crew was great and the food was lovely",
    "@united lost my bags AGAIN!!! worst airline ever https://t.co/abc123 #fail",
    "ok",
    "Delayed 3 hours in Chicago... at least the lounge had coffee. Thanks, I guess?",
]


@pytest.fixture(scope="module")
def server(front_settings):
    with BackgroundServer(ServerSettings(models=ROOT / "models", port=0, **front_settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with RnnServeClient(server.target) as connected:
        yield connected


def _sample(server, name: str, **labels) -> float:
    value = server.running.dataplane.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _wait_for(condition, seconds: float = 1.0) -> float:
    """Seconds until condition() held; fails after `seconds`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        time.sleep(0.01)
    return time.monotonic() - started


def _random_split(text: str, rng: np.random.Generator) -> list[str]:
    cuts = sorted(set(rng.integers(0, len(text) + 1, size=rng.integers(1, 8)).tolist()) | {0, len(text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _final(responses) -> object:
    responses = list(responses)
    assert responses[-1].final and not any(r.final for r in responses[:-1])
    return responses[-1]


def test_text_stream_ends_where_unary_classify_does(client):
    rng = np.random.default_rng(1)
    for text in TEXTS:
        unary = np.array(client.classify("sentiment", [text])[0].probabilities)
        for _ in range(4):
            fragments = _random_split(text, rng)
            responses = list(client.stream("sentiment", fragments))
            assert len(responses) == len(fragments) + 1  # one per chunk, then the final one
            final = responses[-1]
            assert final.final and final.chunks == len(fragments) + 1
            np.testing.assert_allclose(final.running.probabilities, unary, atol=1e-4, err_msg=repr(fragments))


def test_text_stream_reports_an_unfinished_word_provisionally(client):
    responses = list(client.stream("sentiment", ["what a wonder"], top_k=2))
    assert responses[0].tokens < 4  # "wonder" is not committed yet ...
    unary = client.classify("sentiment", ["what a wonder"])[0]
    np.testing.assert_allclose(responses[0].running.probabilities, unary.probabilities, atol=1e-4)  # ... but scored
    assert len(responses[0].running.top) == 2


def _text_input(text: str) -> triton.InferInput:
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


def test_kserve_sequences_with_tritonclient_match_unary(server):
    rng = np.random.default_rng(2)
    kserve = triton.InferenceServerClient(server.target)
    for sequence_id, text in enumerate(TEXTS, start=100):
        unary = kserve.infer("sentiment", [_text_input(text)]).as_numpy("probabilities")[0]
        fragments = _random_split(text, rng)
        for index, fragment in enumerate(fragments):
            result = kserve.infer("sentiment", [_text_input(fragment)], sequence_id=sequence_id,
                                  sequence_start=index == 0, sequence_end=index == len(fragments) - 1)
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], unary, atol=1e-4)
        assert result.as_numpy("label")[0].decode() in ("negative", "neutral", "positive")

    # The same through the bidirectional ModelStreamInfer RPC, with string sequence ids.
    results: queue.Queue = queue.Queue()
    kserve.start_stream(callback=lambda result, error: results.put((result, error)))
    fragments = {f"user-{i}": _random_split(text, rng) for i, text in enumerate(TEXTS)}
    for name, parts in fragments.items():
        for index, part in enumerate(parts):
            kserve.async_stream_infer("sentiment", [_text_input(part)], sequence_id=name,
                                      sequence_start=index == 0, sequence_end=index == len(parts) - 1)
    answers = [results.get(timeout=30) for _ in range(sum(len(p) for p in fragments.values()))]
    kserve.stop_stream()
    assert all(error is None for _, error in answers)
    finals, position = [], 0
    for parts in fragments.values():
        position += len(parts)
        finals.append(answers[position - 1][0].as_numpy("probabilities")[0])
    unary = kserve.infer("sentiment", [_text_input(t) for t in TEXTS[:1]]).as_numpy("probabilities")[0]
    np.testing.assert_allclose(finals[0], unary, atol=1e-4)
    assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0) < 1.0
    kserve.close()


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Keywords said by a speaker the model never heard, between stretches of quiet noise,
    with the time of each word in ms."""
    speaker = next(s for s in (Speaker("en-US", v) for v in ("m2", "f3", "klatt", "Alex", "m5"))
                   if split_of(s) == "test")
    rng = np.random.default_rng(0)
    pieces, truth, position = [], [], 0
    for word in ("yes", "stop", "left"):
        gap = (coloured_noise(24000, "pink", rng) * 0.003).astype(np.float32)
        speech = synthesize(word, speaker)
        pieces += [gap, speech]
        truth.append((word, (position + len(gap)) / 16, (position + len(gap) + len(speech)) / 16))
        position += len(gap) + len(speech)
    pieces.append((coloured_noise(16000, "pink", rng) * 0.003).astype(np.float32))
    return np.concatenate(pieces).astype(np.float32), truth


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def test_audio_stream_in_any_chunking_ends_where_unary_classify_does(client, recording):
    audio = recording[0][:40000]
    unary = np.array(client.classify_audio("keywords", [audio], sample_rate_hz=16000)[0].probabilities)
    rng = np.random.default_rng(3)
    for _ in range(3):
        cuts = np.unique(np.concatenate([[0, len(audio)], rng.integers(0, len(audio), 12), [1, 2, 3]]))
        chunks = [audio[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        final = _final(client.stream("keywords", chunks, sample_rate_hz=16000))
        np.testing.assert_allclose(final.running.probabilities, unary, atol=1e-4)
        assert final.stream_ms == pytest.approx(len(audio) / 16)


def test_audio_stream_at_another_rate_is_resampled_on_the_fly(client, recording):
    import soxr

    audio = soxr.resample(recording[0][:40000], 16000, 44100).astype(np.float32)
    unary = np.array(client.classify_audio("keywords", [audio], sample_rate_hz=44100)[0].probabilities)
    chunks = [_pcm16(audio[i : i + 4410]) for i in range(0, len(audio), 4410)]
    final = _final(client.stream("keywords", chunks, sample_rate_hz=44100))
    # A streaming resampler and a one-shot one differ only at the edges of the signal.
    np.testing.assert_allclose(final.running.probabilities, unary, atol=0.02)
    assert final.running.label == client.classify_audio("keywords", [_pcm16_clip(audio)], sample_rate_hz=44100)[0].label


def _pcm16_clip(samples: np.ndarray) -> np.ndarray:
    return np.frombuffer(_pcm16(samples), "<i2").astype(np.float32) / 32768.0


def test_audio_sequence_with_tritonclient(server, client, recording):
    audio = recording[0][:32000]
    unary = np.array(client.classify_audio("keywords", [audio], sample_rate_hz=16000)[0].probabilities)
    kserve = triton.InferenceServerClient(server.target)
    chunks = [audio[i : i + 1600] for i in range(0, len(audio), 1600)]
    for index, chunk in enumerate(chunks):
        tensor = triton.InferInput("audio", [1, len(chunk)], "FP32")
        tensor.set_data_from_numpy(chunk[None])
        result = kserve.infer("keywords", [tensor], sequence_id=7, sequence_start=index == 0,
                              sequence_end=index == len(chunks) - 1)
    np.testing.assert_allclose(result.as_numpy("probabilities")[0], unary, atol=1e-4)
    kserve.close()


def test_keywords_are_detected_once_each_at_their_times(client, recording):
    audio, truth = recording
    chunks = [_pcm16(audio[i : i + 1600]) for i in range(0, len(audio), 1600)]  # 100 ms chunks
    responses = list(client.stream("keywords", chunks, report_every_ms=1000))
    detections = [d for r in responses for d in r.detections]
    found = {d.keyword: d for d in detections}
    assert len(detections) == len(found), f"a keyword fired twice: {detections}"
    for word, start_ms, end_ms in truth:
        assert word in found, f"{word} not detected: {detections}"
        event = found[word]
        assert start_ms - 250 <= event.end_ms and event.start_ms <= end_ms + 250, (word, start_ms, end_ms, event)
        assert 0 < event.confidence <= 1
    assert set(found) == {w for w, _, _ in truth}
    # Summaries come about once a second of audio (plus detections and the final one).
    assert len(responses) <= len(audio) / 16000 + len(detections) + 2
    assert all(len(r.posteriors) == 12 for r in responses if not r.final or r.posteriors)


def test_a_hundred_concurrent_streams_each_get_their_own_answer(server, client):
    rng = np.random.default_rng(4)
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i} {'love it' if i % 3 else 'hate it'}" for i in range(100)]
    expected = np.array([r.probabilities for r in client.classify("sentiment", texts)])
    calls_before = _sample(server, "rnnserve_batch_rows_count", model="sentiment/step")
    rows_before = _sample(server, "rnnserve_batch_rows_sum", model="sentiment/step")

    async def one(connection: AsyncRnnServeClient, text: str) -> np.ndarray:
        async def fragments():
            for fragment in _random_split(text, rng):
                yield fragment
                await asyncio.sleep(0)
        final = None
        async for response in connection.stream("sentiment", fragments()):
            final = response
        assert final.final
        return np.array(final.running.probabilities)

    async def everyone() -> list[np.ndarray]:
        async with AsyncRnnServeClient(server.target) as connection:
            return await asyncio.gather(*(one(connection, text) for text in texts))

    results = asyncio.run(everyone())
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-4)
    calls = _sample(server, "rnnserve_batch_rows_count", model="sentiment/step") - calls_before
    rows = _sample(server, "rnnserve_batch_rows_sum", model="sentiment/step") - rows_before
    assert rows / calls > 1.5, "steps of concurrent streams did not share ONNX Runtime calls"
    assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0) < 1.0


class _Feeder:
    """A request iterator the test controls: put() requests, close() to half-close."""

    def __init__(self, model: str):
        from serving.grpc.client import stream_requests

        self.queue: queue.Queue = queue.Queue()
        self.queue.put(next(stream_requests(model, [])))

    def put(self, chunk) -> None:
        from serving.grpc.client import stream_requests

        self.queue.put(list(stream_requests("", [chunk]))[1])

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancel_and_disconnect_free_the_state_within_a_second(server, how):
    channel = grpc.insecure_channel(server.target)
    from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc

    feeder = _Feeder("sentiment")
    call = rnnserve_pb2_grpc.RnnServeStub(channel).Stream(iter(feeder))
    before = _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="cancelled")
    feeder.put("still typing ")
    assert next(call).tokens > 0
    assert _sample(server, "rnnserve_active_streams", model="sentiment") == 1
    if how == "cancel":
        call.cancel()
    else:
        channel.close()
    assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0) < 1.0
    assert _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="cancelled") == before + 1
    feeder.queue.put(None)
    channel.close()


def test_idle_streams_and_sequences_are_ended_and_freed(front_settings):
    settings = ServerSettings(models=ROOT / "models", port=0, stream_idle_timeout_s=0.5, **front_settings)
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        feeder = _Feeder("sentiment")
        feeder.put("hello there ")
        responses = client.stub.Stream(iter(feeder))
        assert next(responses).tokens > 0
        with pytest.raises(grpc.RpcError) as raised:
            next(responses)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in raised.value.details()
        feeder.queue.put(None)

        kserve = triton.InferenceServerClient(server.target)
        kserve.infer("sentiment", [_text_input("a quiet ")], sequence_id=5, sequence_start=True)
        assert _sample(server, "rnnserve_active_streams", model="sentiment") == 1
        assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0, 1.6) < 1.6
        assert _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="idle") == 2
        with pytest.raises(InferenceServerException, match="has ended") as raised:
            kserve.infer("sentiment", [_text_input("day")], sequence_id=5)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        kserve.close()


def test_a_stream_past_its_deadline_is_freed(server, client):
    feeder = _Feeder("sentiment")
    feeder.put("waiting for ")
    before = _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="deadline")
    with pytest.raises(grpc.RpcError) as raised:
        list(client.stub.Stream(iter(feeder), timeout=0.5))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0) < 1.0
    assert _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="deadline") == before + 1
    feeder.queue.put(None)


@pytest.mark.parametrize(("requests", "code", "message"), [
    (lambda r: [r.chunk("hello")], grpc.StatusCode.INVALID_ARGUMENT, "chunk before config"),
    (lambda r: [r.config("sentiment"), r.config("sentiment")], grpc.StatusCode.INVALID_ARGUMENT, "only the first"),
    (lambda r: [r.config("nope")], grpc.StatusCode.NOT_FOUND, "not found"),
    (lambda r: [r.config("keywords"), r.chunk("hello")], grpc.StatusCode.INVALID_ARGUMENT, "streams audio"),
    (lambda r: [r.config("sentiment"), r.chunk(b"\x00\x01")], grpc.StatusCode.INVALID_ARGUMENT, "streams text"),
    (lambda r: [r.config("keywords", threshold=1.5)], grpc.StatusCode.INVALID_ARGUMENT, "config.threshold"),
    (lambda r: [r.config("keywords"), r.chunk(b"\x00")], grpc.StatusCode.INVALID_ARGUMENT, "chunk.pcm16"),
    (lambda r: [r.config("keywords"), r.chunk(np.full(1600, np.nan))], grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    (lambda r: [r.config("keywords"), r.chunk(np.zeros(16000 * 31))], grpc.StatusCode.INVALID_ARGUMENT, "limit 30"),
    (lambda r: [r.config("sentiment"), r.chunk("x" * 5000)], grpc.StatusCode.INVALID_ARGUMENT, "limit 4096"),
])
def test_stream_misuse_gets_a_clear_status_and_the_server_keeps_serving(server, client, requests, code, message):
    class R:
        @staticmethod
        def config(model, **options):
            from serving.grpc.client import stream_requests
            return next(stream_requests(model, [], **options))

        @staticmethod
        def chunk(value):
            from serving.grpc.client import stream_requests
            return list(stream_requests("", [value]))[1]

    with pytest.raises(grpc.RpcError) as raised:
        list(client.stub.Stream(iter(requests(R)), timeout=30))
    assert raised.value.code() == code and message in raised.value.details(), raised.value.details()
    assert _wait_for(lambda: all(
        _sample(server, "rnnserve_active_streams", model=m) == 0 for m in ("sentiment", "keywords")))
    assert _final(client.stream("sentiment", ["fine ", "again"])).running.label


def test_too_many_streams_is_resource_exhausted(front_settings):
    settings = ServerSettings(models=ROOT / "models", port=0, max_streams=2, **front_settings)
    with BackgroundServer(settings) as server, RnnServeClient(server.target) as client:
        feeders = [_Feeder("sentiment"), _Feeder("sentiment")]
        calls = [client.stub.Stream(iter(f)) for f in feeders]
        for feeder, call in zip(feeders, calls, strict=True):
            feeder.put("hello ")
            next(call)
        with pytest.raises(grpc.RpcError) as raised:
            list(client.stream("sentiment", ["one more"]))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in raised.value.details()
        kserve = triton.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException, match="limit 2"):
            kserve.infer("sentiment", [_text_input("hi")], sequence_id=1, sequence_start=True)
        for feeder in feeders:
            feeder.queue.put(None)
        for call in calls:
            assert list(call)[-1].final
        assert _final(client.stream("sentiment", ["room again"])).final
        kserve.close()


def test_kserve_sequence_misuse(server):
    kserve = triton.InferenceServerClient(server.target)

    def status(model: str = "sentiment", **options) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as raised:
            kserve.infer(model, options.pop("inputs", [_text_input("hi")]), **options)
        return raised.value.status(), raised.value.message()

    code, message = status(sequence_id=31)
    assert code == "StatusCode.INVALID_ARGUMENT" and "sequence_start" in message
    kserve.infer("sentiment", [_text_input("hi ")], sequence_id=32, sequence_start=True)
    code, message = status(sequence_id=32, sequence_start=True)
    assert code == "StatusCode.INVALID_ARGUMENT" and "already active" in message
    kserve.infer("sentiment", [_text_input("there")], sequence_id=32, sequence_end=True)
    code, message = status(sequence_id=32)
    assert code == "StatusCode.INVALID_ARGUMENT" and "has ended" in message
    two = triton.InferInput("text", [2], "BYTES")
    two.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    code, message = status(sequence_id=33, sequence_start=True, inputs=[two])
    assert code == "StatusCode.INVALID_ARGUMENT" and "one fragment" in message
    assert _wait_for(lambda: _sample(server, "rnnserve_active_streams", model="sentiment") == 0)
    assert kserve.infer("sentiment", [_text_input("still serving")]).as_numpy("label")[0]
    kserve.close()


def test_a_model_without_a_step_graph_does_not_stream(tmp_path):
    import json
    import shutil

    version = tmp_path / "batchonly" / "1"
    shutil.copytree(ROOT / "models" / "sentiment" / "1", version)
    (version / "step.onnx").unlink()
    card = json.loads((version / "model.json").read_text())
    del card["streaming"]
    (version / "model.json").write_text(json.dumps(card))
    with BackgroundServer(ServerSettings(models=tmp_path, port=0)) as server, \
            RnnServeClient(server.target) as client:
        assert not client.get_model("batchonly").streaming
        with pytest.raises(grpc.RpcError) as raised:
            list(client.stream("batchonly", ["hello"]))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not stream" in raised.value.details()
        kserve = triton.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException, match="does not stream"):
            kserve.infer("batchonly", [_text_input("hi")], sequence_id=1, sequence_start=True)
        assert client.classify("batchonly", ["hello"])[0].label
        kserve.close()


def test_the_cards_keyword_thresholds_are_the_stream_default_and_a_requested_threshold_replaces_them(
        tmp_path, recording):
    """A card whose operating point gives "stop" a threshold of its own that no take reaches: the
    stream hears the other keywords, not "stop"; a request that sets a threshold sets it for all
    keywords, and "stop" is heard again. A card naming a label that is not a keyword is refused."""
    import json
    import shutil

    version = tmp_path / "keywords" / "2"
    shutil.copytree(ROOT / "models" / "keywords" / "2", version)
    card = json.loads((version / "model.json").read_text())
    (point,) = [p for p in card["detection"]["operating_points"]
                if p["false_alarm_budget_per_hour"] == card["detection"]["default_budget_per_hour"]]
    shared = point["detector"]["threshold"]
    point["detector"]["keyword_thresholds"] = {"stop": 0.999999}
    (version / "model.json").write_text(json.dumps(card))
    audio, truth = recording
    chunks = [_pcm16(audio[i : i + 1600]) for i in range(0, len(audio), 1600)]
    with BackgroundServer(ServerSettings(models=tmp_path, port=0)) as server, \
            RnnServeClient(server.target) as client:
        heard = [d.keyword for r in client.stream("keywords", chunks) for d in r.detections]
        assert heard == ["yes", "left"]
        heard = [d.keyword for r in client.stream("keywords", chunks, threshold=shared) for d in r.detections]
        assert heard == [word for word, _, _ in truth]

    point["detector"]["keyword_thresholds"] = {"_silence_": 0.5}
    (version / "model.json").write_text(json.dumps(card))
    with BackgroundServer(ServerSettings(models=tmp_path, port=0)) as server, \
            RnnServeClient(server.target) as client:
        (summary,) = client.list_models()
        assert not summary.ready and "'_silence_' is not a keyword" in summary.reason
