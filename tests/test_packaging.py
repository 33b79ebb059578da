"""Packaging contracts: serving never needs torch; the generated protobuf code is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_serving_does_not_import_torch():
    code = (
        "import sys; import serving, serving.cli, serving.grpc.server, serving.grpc.client; "
        "serving.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_generated_protobuf_code_is_current():
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
