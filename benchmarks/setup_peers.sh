#!/usr/bin/env bash
# The peers of benchmarks/peers.py and servers.py, each in its own venv under .bench-venvs/ (not in
# git), and h2load (Debian's nghttp2-client) with curl, the load and the check of servers.py.
# PyTriton bundles a real Triton server; its Python backend needs this interpreter's libpython,
# which the benchmarks put on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tools=()
command -v h2load >/dev/null || tools+=(nghttp2-client)
command -v curl >/dev/null || tools+=(curl)
if [ "${#tools[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tools[@]}" >/dev/null) \
      || echo "setup_peers: could not install ${tools[*]}; servers.py will report it" >&2
  else
    echo "setup_peers: install ${tools[*]} (Debian packages) for benchmarks/servers.py" >&2
  fi
fi
mkdir -p .bench-venvs
for peer in pytriton mlserver; do
  if [ ! -x ".bench-venvs/$peer/bin/python" ]; then
    "$PYTHON" -m venv ".bench-venvs/$peer"
  fi
done
.bench-venvs/pytriton/bin/pip install --quiet "nvidia-pytriton==0.7.0" "onnxruntime==1.32.0" numpy \
  || echo "setup_peers: PyTriton could not be installed; peers.py will report it" >&2
# uvloop 0.22+ raises in get_event_loop() without a running loop, which kills MLServer 1.7's
# parallel workers at start ("There is no current event loop"); 0.21 lets them run.
.bench-venvs/mlserver/bin/pip install --quiet "mlserver==1.7.1" "uvloop==0.21.0" "onnxruntime==1.32.0" numpy \
  || echo "setup_peers: MLServer could not be installed; peers.py will report it" >&2
