"""`rnnserve serve` settings: a TOML config file under environment variables and flags, JSON
log lines, and clear refusals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.cli import _config_file

ROOT = Path(__file__).resolve().parent.parent
RNNSERVE = [sys.executable, "-m", "serving"]


def test_config_file_values_give_way_to_environment_variables(tmp_path, monkeypatch):
    config = tmp_path / "rnnserve.toml"
    config.write_text('port = 0\nbatch_max_rows = 8\nmodels = "elsewhere"\n')
    monkeypatch.setenv("RNNSERVE_BATCH_MAX_ROWS", "16")
    assert _config_file(config) == {"port": 0, "models": "elsewhere"}


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
