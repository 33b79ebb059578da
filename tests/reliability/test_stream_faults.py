"""Stream faults the cancel/disconnect/idle/deadline tests of tests/serving/grpc/test_streaming.py
do not cover: a client process killed (SIGKILL) mid-stream, a SIGTERM to a
`rnnserve serve` process with streams open, and, for every way a stream can end early, that the
other streams running at the same time finish with the right answers."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serving.grpc.client import RnnServeClient, stream_requests
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.handlers import Drain
from serving.grpc.server import BackgroundServer
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
GOOD_TEXTS = [
    "what a wonderful flight, the crew was great and the food was lovely",
    "@united lost my bags AGAIN!!! worst airline ever #fail",
    "Delayed 3 hours in Chicago... at least the lounge had coffee. Thanks, I guess?",
]
TONE = (0.2 * np.sin(2 * np.pi * 440 * np.arange(24000) / 16000)).astype(np.float32)

# A client in its own process: a text stream (topic/1; topic/2 reads whole articles in chunks
# and does not stream) and an audio stream (keywords), both fed every 50 ms until the process
# dies; "open" once both have been answered.
CLIENT = """
import sys, threading, time
import numpy as np
from serving.grpc.client import RnnServeClient

target = sys.argv[1]
client = RnnServeClient(target, timeout_s=600)
started = threading.Barrier(3)

def text_chunks():
    yield "markets "
    while True:
        yield "shares and bonds "
        time.sleep(0.05)

def audio_chunks():
    while True:
        yield np.zeros(800, np.float32)
        time.sleep(0.05)

def run(stream):
    first = True
    for _ in stream:
        if first:
            first = False
            started.wait()

threading.Thread(target=run, args=(client.stream("topic", text_chunks(), version="1"),), daemon=True).start()
threading.Thread(target=run, args=(client.stream("keywords", audio_chunks(), sample_rate_hz=16000),),
                 daemon=True).start()
started.wait()
print("open", flush=True)
time.sleep(600)
"""


def _sample(server, name: str, **labels) -> float:
    value = server.running.dataplane.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _seconds_until(condition, limit: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit, f"not within {limit} s"
        time.sleep(0.01)
    return time.monotonic() - started


class _Feeder:
    """A Stream request iterator the test controls: put() chunks, close() to half-close."""

    def __init__(self, model: str, **config):
        self.queue: queue.Queue = queue.Queue()
        self.queue.put(next(stream_requests(model, [], **config)))

    def put(self, chunk) -> None:
        self.queue.put(list(stream_requests("", [chunk]))[1])

    def close(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


class GoodStreams:
    """Streams that behave: each text in fragments every 50 ms, and one audio clip in 50 ms
    chunks, over `seconds`, on threads; .check() compares each end with a unary call."""

    def __init__(self, target: str, seconds: float):
        self.target, self.seconds = target, seconds
        self.results: dict[str, object] = {}
        self.threads = [threading.Thread(target=self._text, args=(t,)) for t in GOOD_TEXTS]
        self.threads.append(threading.Thread(target=self._audio))

    def start(self) -> GoodStreams:
        for thread in self.threads:
            thread.start()
        return self

    def _text(self, text: str) -> None:
        words = text.split(" ")
        pause = self.seconds / len(words)

        def fragments():
            for index, word in enumerate(words):
                yield word + (" " if index < len(words) - 1 else "")
                time.sleep(pause)

        try:
            with RnnServeClient(self.target) as client:
                self.results[text] = list(client.stream("sentiment", fragments()))[-1]
        except Exception as error:  # reported by check()
            self.results[text] = error

    def _audio(self) -> None:
        count = int(self.seconds / 0.05)
        audio = np.resize(TONE, count * 800)

        def chunks():
            for index in range(count):
                yield audio[index * 800 : (index + 1) * 800]
                time.sleep(0.05)

        try:
            with RnnServeClient(self.target) as client:
                self.results["audio"] = (audio, list(client.stream("keywords", chunks(), sample_rate_hz=16000))[-1])
        except Exception as error:
            self.results["audio"] = error

    def check(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
        with RnnServeClient(self.target) as client:
            for text in GOOD_TEXTS:
                final = self.results[text]
                assert not isinstance(final, Exception), f"a good stream failed: {final!r}"
                assert final.final
                unary = client.classify("sentiment", [text])[0]
                np.testing.assert_allclose(final.running.probabilities, unary.probabilities, atol=1e-4)
            result = self.results["audio"]
            assert not isinstance(result, Exception), f"the good audio stream failed: {result!r}"
            audio, final = result
            unary = client.classify_audio("keywords", [audio], sample_rate_hz=16000)[0]
            assert final.final and final.stream_ms == pytest.approx(len(audio) / 16)
            np.testing.assert_allclose(final.running.probabilities, unary.probabilities, atol=1e-4)


def _client_process(target: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", CLIENT, target], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "open", process.stderr.read() if process.poll() is not None else line
    return process


def test_a_client_process_killed_mid_stream_frees_its_streams_and_others_finish_right():
    """SIGKILL: the kernel closes the client's socket and the server frees both of its streams
    (text and audio) within a second, while good streams run on to the right answers."""
    how = "SIGKILL"
    with BackgroundServer(ServerSettings(models=MODELS, port=0)) as server:
        client = _client_process(server.target)
        try:
            assert _sample(server, "rnnserve_active_streams", model="topic") == 1
            assert _sample(server, "rnnserve_active_streams", model="keywords") == 1
            good = GoodStreams(server.target, seconds=2.5).start()
            time.sleep(0.5)  # the good streams are under way
            assert _sample(server, "rnnserve_active_streams", model="keywords") == 2
            client.send_signal(signal.SIGKILL)
            freed = _seconds_until(lambda: _sample(server, "rnnserve_active_streams", model="topic") == 0, 1.0)
            assert _sample(server, "rnnserve_streams_closed_total", model="topic", reason="cancelled") == 1
            assert _sample(server, "rnnserve_streams_closed_total", model="keywords", reason="cancelled") == 1
            # The audio streams still open at this point are the good one only.
            assert _sample(server, "rnnserve_active_streams", model="keywords") <= 1
            good.check()
            assert _sample(server, "rnnserve_active_streams", model="sentiment") == 0
            assert _sample(server, "rnnserve_streams_closed_total", model="sentiment", reason="end") == 3
            print(f"{how}: the killed client's streams freed after {freed:.2f} s")
        finally:
            client.kill()
            client.wait(timeout=10)


def test_early_ends_of_every_kind_leave_the_other_streams_untouched():
    """While good streams run (2.5 s each), others end early: cancelled by the client, past their
    deadline, idle past stream_idle_timeout_s (a typed stream and a KServe sequence), and
    misused (a chunk of the wrong kind). Each is freed; every good stream ends right."""
    settings = ServerSettings(models=MODELS, port=0, stream_idle_timeout_s=1.0)
    with BackgroundServer(settings) as server:
        good = GoodStreams(server.target, seconds=2.5).start()
        channel = grpc.insecure_channel(server.target)
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        feeders = {name: _Feeder("topic", version="1") for name in ("cancel", "deadline", "idle", "misuse")}
        calls = {name: stub.Stream(iter(feeder), timeout=0.8 if name == "deadline" else 30)
                 for name, feeder in feeders.items()}
        for feeder in feeders.values():
            feeder.put("stocks ")
        for call in calls.values():
            assert next(call).tokens > 0
        kserve = triton.InferenceServerClient(server.target)
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"bonds "], dtype=object))
        kserve.infer("topic", [text], model_version="1", sequence_id=9, sequence_start=True)
        assert _sample(server, "rnnserve_active_streams", model="topic") == 5

        calls["cancel"].cancel()
        feeders["misuse"].put(b"\x00\x01")
        codes = {}
        for name, call in calls.items():
            try:
                list(call)
                codes[name] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                codes[name] = error.code()
        assert codes == {"cancel": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
                         "idle": grpc.StatusCode.DEADLINE_EXCEEDED, "misuse": grpc.StatusCode.INVALID_ARGUMENT}
        _seconds_until(lambda: _sample(server, "rnnserve_active_streams", model="topic") == 0, 1.5)
        closed = {reason: _sample(server, "rnnserve_streams_closed_total", model="topic", reason=reason)
                  for reason in ("cancelled", "deadline", "idle", "error")}
        assert closed == {"cancelled": 1, "deadline": 1, "idle": 2, "error": 1}, closed
        with pytest.raises(InferenceServerException, match="has ended"):
            kserve.infer("topic", [text], model_version="1", sequence_id=9)
        for feeder in feeders.values():
            feeder.close()
        good.check()
        kserve.close()
        channel.close()


def _start_cli(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str, int, Path]:
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--models", str(MODELS), "--port", "0",
                                    "--metrics-port", "0", *flags], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (serving := re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(log_path.read_text()[-3000:])
        time.sleep(0.1)
    metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)", log_path.read_text())
    return process, f"127.0.0.1:{serving.group(1)}", int(metrics.group(1)), log_path


def _metric(port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_with_streams_open_lets_the_finishing_ones_end_and_ends_the_rest_clearly(tmp_path):
    """`rnnserve serve --grace-period-s 3` with three streams open gets SIGTERM: a new stream is
    refused (UNAVAILABLE), a stream that goes on sending and half-closes within the grace period
    gets its final answer, a stream that never ends is ended when the grace period is over with
    UNAVAILABLE saying why (never CANCELLED, UNKNOWN or INTERNAL), and the process exits 0 in time."""
    process, target, metrics_port, log_path = _start_cli(tmp_path, "--grace-period-s", "3")
    try:
        channel = grpc.insecure_channel(target)
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        finishing, hanging = _Feeder("sentiment"), _Feeder("sentiment")
        audio = _Feeder("keywords", sample_rate_hz=16000)
        finishing_call, hanging_call = stub.Stream(iter(finishing)), stub.Stream(iter(hanging))
        audio_call = stub.Stream(iter(audio))
        finishing.put("what a ")
        hanging.put("never ending ")
        audio.put(TONE[:8000])
        for call in (finishing_call, hanging_call, audio_call):
            next(call)
        assert _metric(metrics_port, "rnnserve_active_streams", model="sentiment") == 2
        assert _metric(metrics_port, "rnnserve_active_streams", model="keywords") == 1

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with RnnServeClient(target) as late, pytest.raises(grpc.RpcError) as refused:
            list(late.stream("sentiment", ["too late"]))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # Streams already open go on during the grace period.
        finishing.put("wonderful flight")
        finishing.close()
        audio.put(TONE[8000:16000])
        audio.close()
        final = list(finishing_call)[-1]
        audio_final = list(audio_call)[-1]
        assert final.final and final.running.label == "positive"
        assert audio_final.final and audio_final.stream_ms == pytest.approx(1000)

        with pytest.raises(grpc.RpcError) as ended:
            list(hanging_call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        assert Drain.STREAM_ENDED in ended.value.details(), ended.value
        ended_after = time.monotonic() - signalled
        assert 2.5 < ended_after < 6, f"the open stream ended {ended_after:.1f} s after SIGTERM (grace 3 s)"
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 8
        hanging.close()
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
    log = log_path.read_text()
    assert "shutting down" in log and "Traceback" not in log, log[-3000:]
