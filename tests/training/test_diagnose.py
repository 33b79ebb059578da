"""`rnnserve diagnose --quick`: the gradient story, measured for real at small scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_diagnose_quick_writes_table_plots_and_shows_the_story(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "serving", "diagnose", "--quick", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for name in ("gradient_flow.png", "accuracy_vs_length.png", "exploding_gradients.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "diagnose.json").read_text())
    assert "| lstm |" in result.stdout and "with clipping" in result.stdout

    flow = report["gradient_flow"]
    def carried(cell):  # gradient reaching the first step relative to the last, after training
        return flow[cell]["trained"][-1] / flow[cell]["trained"][0]
    # After training, the gated cells carry the gradient back to the first step; the plain RNN does not.
    assert carried("lstm") > 1000 * carried("rnn")
    assert carried("gru") > 1000 * carried("rnn")
    accuracy = {(r["cell"], r["length"]): r["accuracy"] for r in report["budget"]}
    longest = max(r["length"] for r in report["budget"])
    assert accuracy[("lstm", longest)] > accuracy[("rnn", longest)] + 0.2
    exploding = report["exploding"]
    assert exploding["with_clipping"]["clipped_fraction"] > 0
    assert exploding["with_clipping"]["accuracy"] > exploding["without_clipping"]["accuracy"] + 0.2
