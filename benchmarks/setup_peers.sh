#!/usr/bin/env bash
# The peers of benchmarks/peers.py, each in its own venv under .bench-venvs/ (not in git).
# PyTriton bundles a real Triton server; its Python backend needs this interpreter's libpython,
# which benchmarks/peers.py puts on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .bench-venvs
for peer in pytriton mlserver; do
  if [ ! -x ".bench-venvs/$peer/bin/python" ]; then
    "$PYTHON" -m venv ".bench-venvs/$peer"
  fi
done
.bench-venvs/pytriton/bin/pip install --quiet "nvidia-pytriton==0.7.0" "onnxruntime==1.32.0" numpy \
  || echo "setup_peers: PyTriton could not be installed; peers.py will report it" >&2
.bench-venvs/mlserver/bin/pip install --quiet "mlserver==1.7.1" "onnxruntime==1.32.0" numpy \
  || echo "setup_peers: MLServer could not be installed; peers.py will report it" >&2
