"""Data-parallel training: two local processes under torchrun (gloo), rank 0 writes the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training.export import export_run

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training", "train", "sentiment", "--quick", "--epochs", "1", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (tmp_path / "sentiment").iterdir()  # rank 0 only
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and len(run["history"]) == 1
    assert result.stdout.count("run: ") == 1
    # Validation metrics were gathered from both ranks' shards: every example was scored once.
    assert sum(sum(row) for row in run["metrics"]["confusion_matrix"]) == run["data"]["split"]["test"]
    version = export_run(run_dir, tmp_path / "models", name="sentiment", exporter="torchscript")
    assert (version / "model.onnx").is_file()
