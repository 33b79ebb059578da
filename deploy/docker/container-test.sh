#!/usr/bin/env bash
# make container-test: build the CPU image with podman, run it, wait for gRPC health SERVING,
# make one typed Classify and one tritonclient ModelInfer against it, send SIGTERM and check a
# clean exit, and print the image size.
#
# Works without a docker engine and without access to public registries: when the official
# Python base image cannot be pulled, a Debian bookworm base is made with debootstrap (with
# python3 and python3-venv) and cached as localhost/rnnserve-base:bookworm. The build reaches
# PyPI with the host's CA bundle mounted for the build only; nothing of the host stays in the image.
#
# Environment: PYTHON (a Python with the project's dev dependencies, default .venv/bin/python),
# IMAGE (default localhost/rnnserve:cpu), BASE_IMAGE (skip the base image logic),
# RNNSERVE_TEST_PORT (default 50091).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-localhost/rnnserve:cpu}
PORT=${RNNSERVE_TEST_PORT:-50091}
NAME=rnnserve-container-test
LOCAL_BASE=localhost/rnnserve-base:bookworm
PUBLIC_BASE=docker.io/library/python:3.11-slim-bookworm
HOST_CA=/etc/ssl/certs/ca-certificates.crt

work=$(mktemp -d)
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "podman"
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi
# A configuration podman runs with in a VM or container without systemd and nested cgroups.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$work/containers.conf"
podman --version

step "base image"
if [ -n "${BASE_IMAGE:-}" ]; then
  base=$BASE_IMAGE
elif podman image exists "$PUBLIC_BASE" || timeout 60 podman pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
  base=$PUBLIC_BASE
elif podman image exists "$LOCAL_BASE"; then
  base=$LOCAL_BASE
  echo "using the cached $LOCAL_BASE"
else
  echo "$PUBLIC_BASE cannot be pulled here: building $LOCAL_BASE with debootstrap"
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" \
    "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
  # What a slim image leaves out too: package caches, documentation, manuals, translations.
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
    "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/info/"* \
    "$work/rootfs/usr/share/locale/"*
  tar -C "$work/rootfs" -c . | podman import - "$LOCAL_BASE" >/dev/null
  base=$LOCAL_BASE
fi
echo "base: $base"

step "build $IMAGE"
# pip inside the build trusts the host's CA bundle through a mounted pip.conf (build only).
printf '[global]\ncert = /run/host-ca.crt\n' >"$work/pip.conf"
started=$(date +%s)
podman build --pull=never --build-arg "BASE_IMAGE=$base" \
  -v "$HOST_CA:/run/host-ca.crt:ro" -v "$work/pip.conf:/etc/pip.conf:ro" \
  -f deploy/docker/Dockerfile -t "$IMAGE" . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }
echo "built in $(( $(date +%s) - started )) s"

step "run"
podman run -d --name "$NAME" --network host -e RNNSERVE_HOST=127.0.0.1 -e "RNNSERVE_PORT=$PORT" \
  -e RNNSERVE_METRICS_PORT=0 \
  --read-only --security-opt no-new-privileges "$IMAGE" >/dev/null
target="127.0.0.1:$PORT"
for _ in $(seq 1 120); do
  if "$PYTHON" -m serving health --target "$target" >/dev/null 2>&1; then break; fi
  if [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" != "true" ]; then podman logs "$NAME"; exit 1; fi
  sleep 0.5
done
"$PYTHON" -m serving health --target "$target"
podman exec "$NAME" rnnserve health >/dev/null && echo "HEALTHCHECK command inside the image: SERVING"
[ "$(podman exec "$NAME" id -u)" != "0" ] && echo "runs as uid $(podman exec "$NAME" id -u)"

step "typed Classify and tritonclient ModelInfer"
"$PYTHON" - "$target" <<'EOF'
import sys

import numpy as np
import tritonclient.grpc as triton

from serving.grpc.client import RnnServeClient

target = sys.argv[1]
with RnnServeClient(target) as client:
    (result,) = client.classify("sentiment", ["what a wonderful flight"])
    print(f"typed Classify: {result.label} {result.score:.3f}")
    assert result.label in ("negative", "neutral", "positive")
kserve = triton.InferenceServerClient(target)
text = triton.InferInput("text", [1], "BYTES")
text.set_data_from_numpy(np.array([b"my bags were lost again"], dtype=object))
answer = kserve.infer("sentiment", [text])
print(f"tritonclient ModelInfer: {answer.as_numpy('label')[0].decode()} {answer.as_numpy('probabilities')[0].max():.3f}")
assert answer.as_numpy("probabilities").shape == (1, 3)
EOF

step "SIGTERM"
started=$(date +%s%N)
podman stop -t 30 "$NAME" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
echo "exit code $code after $(( ($(date +%s%N) - started) / 1000000 )) ms"
podman logs "$NAME" 2>&1 | grep -q "shutting down" || { podman logs "$NAME"; echo "no clean shutdown in the log"; exit 1; }
[ "$code" = "0" ] || { podman logs "$NAME"; exit 1; }

step "image size"
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
echo "$IMAGE: $(( size / 1000000 )) MB (base $base)"
echo "container test passed"
