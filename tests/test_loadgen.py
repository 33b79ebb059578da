"""The compiled stream load generator (benchmarks/loadgen, Go): it builds from the repository
and Debian's Go packages alone, and a short run (3 typed streams and 3 KServe sequences of
2.5 s) against a real `rnnserve serve` and the transport-only server passes the benchmark's
level condition (p99 <= 100 ms, every stream kept pace, detections equal to the recording's
alone). Skipped, with the reason, where the Go toolchain or espeak-ng is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GO_GRPC = Path("/usr/share/gocode/src/google.golang.org/grpc")

pytestmark = pytest.mark.skipif(
    shutil.which("go") is None or not GO_GRPC.is_dir(),
    reason="the Go toolchain is absent (Debian: apt-get install golang-go golang-google-grpc-dev)",
)


def test_the_load_generator_builds_from_the_repository_alone():
    tracked = subprocess.run(["git", "ls-files", "benchmarks/loadgen"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    # The generated protobuf code is checked in: the build runs no protoc and downloads nothing.
    assert "benchmarks/loadgen/src/rnnserve/generated/rnnserve/v1/rnnserve.pb.go" in tracked
    done = subprocess.run([sys.executable, "benchmarks/stream_load.py", "--build-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (ROOT / "benchmarks" / "loadgen" / "bin" / "loadgen").is_file()


def quick_run(output: Path) -> dict:
    done = subprocess.run([sys.executable, "benchmarks/stream_load.py", "--quick", "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    return json.loads(output.read_text())


def levels(report: dict) -> list[tuple[str, str, dict]]:
    return [(server, mode, level) for server, by_mode in report["servers"].items()
            for mode, data in by_mode.items() for level in data["levels"]]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is absent: the recordings need it")
def test_a_short_run_against_a_real_server_passes(tmp_path):
    report = quick_run(tmp_path / "stream_load.json")
    if not all(level["passed"] for _, _, level in levels(report)):
        # A real-time condition on shared cores: one stall of the machine fails a level, so a
        # failing run is tried once more; a server that cannot keep 3 streams fails both.
        report = quick_run(tmp_path / "stream_load.json")
    native = importlib.util.find_spec("pygrpc_native") is not None  # the do-nothing server on the native front
    assert set(report["servers"]) == {"rnnserve", "rnnserve per-stream", "transport only",
                                      *(["transport only (native)"] if native else [])}
    assert {(server, mode) for server, mode, _ in levels(report)} == {
        ("rnnserve", "typed"), ("rnnserve", "kserve"), ("rnnserve", "typed-1s"), ("rnnserve", "kserve-unary"),
        ("rnnserve per-stream", "typed"), ("transport only", "typed"), ("transport only", "kserve"),
        *([("transport only (native)", "kserve-unary")] if native else [])}
    for server, mode, level in levels(report):
        assert level["passed"], (server, mode, level)
        assert level["streams_kept_pace"] == level["detections_equal"] == level["streams"] == 3
    # Rows per step.onnx call come from the server's own metrics: one stream's step per call when
    # cellular batching is off, never more than the streams when it is on.
    per_stream = report["servers"]["rnnserve per-stream"]["typed"]["levels"][0]
    assert per_stream["step_calls"] > 0 and per_stream["rows_per_step_call"] == 1.0
    for mode in ("typed", "kserve", "typed-1s", "kserve-unary"):
        cellular = report["servers"]["rnnserve"][mode]["levels"][0]
        assert cellular["step_calls"] > 0 and 1.0 <= cellular["rows_per_step_call"] <= 3.0
    assert report["servers"]["transport only"]["typed"]["levels"][0]["rows_per_step_call"] is None
    # Reports once a second answer fewer times than a response per chunk, with the same detections.
    assert (report["servers"]["rnnserve"]["typed-1s"]["levels"][0]["responses"]
            < report["servers"]["rnnserve"]["typed"]["levels"][0]["responses"])
    typed = report["servers"]["rnnserve"]["typed"]["levels"][0]
    # Every spoken keyword is either timed from its end to its detection or counted as missed.
    assert typed["keywords_spoken"] == 3
    detected = typed["keyword_latency_ms"]["count"] if typed["keyword_latency_ms"] else 0
    assert detected + typed["keywords_missed"] == typed["keywords_spoken"]
