"""The soak driver (benchmarks/soak.py, also `make soak`) for the CI duration: 60 s of mixed
typed/KServe unary, batch, text and audio stream and bad-request load on a real server
process, with zero unexpected answers and under 5 % RSS growth after the warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))


def test_soak(tmp_path):
    summary_path = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "benchmarks/soak.py", "--seconds", str(SECONDS), "--json",
                             str(summary_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=SECONDS + 240)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["errors"] == 0 and summary["rss_growth_pct"] < 5 and summary["server_exit_code"] == 0
    assert summary["requests_total"] > 10 * SECONDS, summary
    assert all(summary["requests"].get(kind) for kind in (
        "typed_text", "typed_batch", "typed_audio", "kserve_text", "kserve_audio", "text_stream", "audio_stream",
        "kserve_sequence", "bad")), summary
