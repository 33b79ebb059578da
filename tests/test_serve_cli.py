"""`rnnserve serve` settings: a TOML config file under environment variables and flags, JSON
log lines, and clear refusals (--grpc-front among them)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.cli import _config_file, build_parser
from serving.grpc.front import native_installed

ROOT = Path(__file__).resolve().parent.parent
RNNSERVE = [sys.executable, "-m", "serving"]


def test_config_file_values_give_way_to_environment_variables(tmp_path, monkeypatch):
    config = tmp_path / "rnnserve.toml"
    config.write_text('port = 0\nbatch_max_rows = 8\nmodels = "elsewhere"\n')
    monkeypatch.setenv("RNNSERVE_BATCH_MAX_ROWS", "16")
    assert _config_file(config) == {"port": 0, "models": "elsewhere"}


def test_a_config_file_gives_models_their_own_instances(tmp_path):
    from serving.settings import ServerSettings

    config = tmp_path / "rnnserve.toml"
    config.write_text('instances = 2\n[model_settings.topic]\ninstances = 1\nintra_op_threads = 2\n')
    settings = ServerSettings(**_config_file(config))
    runtime = settings.runtime_options()
    topic = settings.model_runtime_options(runtime)["topic"]
    assert runtime.instances == 2 and (topic.instances, topic.intra_op_threads) == (1, 2)
    config.write_text("[model_settings.topic]\ninstances = 0\n")
    result = subprocess.run([*RNNSERVE, "serve", "--config", str(config)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--model-settings (RNNSERVE_MODEL_SETTINGS) topic.instances: 0" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("no", False), ("0", False), ("true", True),
                                                 ("on", True)])
def test_boolean_flags_read_false_as_false(value, expected):
    arguments = build_parser().parse_args(["serve", "--intra-op-spinning", value])
    assert arguments.intra_op_spinning is expected


def test_a_boolean_flag_that_is_not_one_is_named():
    result = subprocess.run([*RNNSERVE, "serve", "--intra-op-spinning", "maybe"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--intra-op-spinning" in result.stderr and "'maybe'" in result.stderr


def test_unknown_setting_in_the_config_file_is_named(tmp_path):
    config = tmp_path / "rnnserve.toml"
    config.write_text("port = 0\nbatch_size = 8\n")
    result = subprocess.run([*RNNSERVE, "serve", "--config", str(config)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown settings ['batch_size']" in result.stderr


def test_serve_from_a_config_file_with_json_logs_and_exit_0_on_sigterm(tmp_path):
    config = tmp_path / "rnnserve.toml"
    config.write_text(f'models = "{ROOT / "models"}"\nport = 0\nmetrics_port = 0\nbatch_max_delay_ms = 1.0\n')
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([*RNNSERVE, "serve", "--config", str(config), "--log-format", "json"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"serving .* on 127\.0\.0\.1:\d+", log_path.read_text()):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    messages = " ".join(entry["message"] for entry in entries)
    assert "Prometheus metrics on http://127.0.0.1:" in messages and "shutting down" in messages


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(tmp_path):
    """Requests held in the batcher (2 s delay) when SIGTERM comes: health watchers hear
    NOT_SERVING at once, all requests answer, a new connection is refused, and the process
    exits 0 inside the grace period."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.grpc.client import RnnServeClient

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*RNNSERVE, "serve", "--models", str(ROOT / "models"), "--port", "0", "--batch-max-delay-ms", "2000",
             "--grace-period-s", "20"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        target = f"127.0.0.1:{match.group(1)}"
        texts = [f"flight number {i} was {'great' if i % 2 else 'awful'}" for i in range(8)]
        with RnnServeClient(target) as client, ThreadPoolExecutor(len(texts)) as pool:
            client.classify("sentiment", ["warm up the channel"])
            watch_channel = grpc.insecure_channel(target)
            watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            pending = [pool.submit(client.classify, "sentiment", [text]) for text in texts]
            time.sleep(0.5)
            assert not any(future.done() for future in pending), "requests were not held in the batcher"
            server.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - started < 1.5, "health did not turn NOT_SERVING at once"
            watch.cancel()
            watch_channel.close()
            with RnnServeClient(target) as late:
                try:
                    late.classify("sentiment", ["too late"])
                    raise AssertionError("a request after SIGTERM was accepted")
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            answers = [future.result(timeout=30) for future in pending]
        assert [len(answer) for answer in answers] == [1] * len(texts)
        assert all(answer[0].label in {"negative", "neutral", "positive"} for answer in answers)
        assert server.wait(timeout=20) == 0
        assert time.monotonic() - started < 20
    finally:
        if server.poll() is None:
            server.kill()
    assert "shutting down" in log_path.read_text()


def test_bench_names_an_unknown_benchmark():
    result = subprocess.run([*RNNSERVE, "bench", "--only", "runtime,warp"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "warp" in result.stderr and "runtime, scoring" in result.stderr


def _serve(*flags: str, hide_native: bool = False) -> subprocess.CompletedProcess:
    """`rnnserve serve FLAGS` in a fresh interpreter; hide_native blocks the import of pygrpc_native
    there, as on a machine without rnnserve[native]."""
    hide = "sys.modules['pygrpc_native'] = None; " if hide_native else ""
    code = f"import sys; {hide}from serving.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "serve", "--models", str(ROOT / "models"), "--port", "0",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_bad_grpc_front_is_named_with_the_choices():
    result = _serve("--grpc-front", "fast")
    assert result.returncode == 2
    assert "--grpc-front (RNNSERVE_GRPC_FRONT): 'fast': input should be 'grpcio', 'native' or 'auto'" in result.stderr


def test_native_without_pygrpc_native_is_a_clear_error_and_auto_says_grpcio():
    result = _serve("--grpc-front", "native", "--keepalive-max-ping-strikes", "0", hide_native=True)
    assert result.returncode == 2 and "--grpc-front native: pygrpc-native is not installed" in result.stderr
    assert "rnnserve[native]" in result.stderr
    code = ("import sys; sys.modules['pygrpc_native'] = None\n"
            "from serving.grpc.front import choose_front\nfrom serving.settings import ServerSettings\n"
            "print(choose_front(ServerSettings(grpc_front='auto', keepalive_max_ping_strikes=0)))")
    chosen = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "name='grpcio'" in chosen.stdout and "not installed" in chosen.stdout, chosen.stdout + chosen.stderr


@pytest.mark.skipif(not native_installed(), reason="pygrpc-native is not installed (rnnserve[native])")
def test_native_with_its_defaults_is_refused_before_any_work():
    result = _serve("--grpc-front", "native")
    assert result.returncode == 2 and "--keepalive-max-ping-strikes 2" in result.stderr, result.stderr
    assert "serving.repository" not in result.stderr  # refused before any model was loaded
