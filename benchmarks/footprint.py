"""Server footprint: start to ready with the bundled models, resident memory, image size.

    python benchmarks/footprint.py [--repeats 5]

Start to ready: from launching `rnnserve serve` until grpc.health.v1 answers SERVING (polled
every 10 ms). RSS: the server's VmRSS after it is ready and after 200 mixed requests (text,
audio, a stream). Image size: `podman image inspect localhost/rnnserve:cpu` when that image
exists (make container-test builds it). Writes benchmarks/results/footprint.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import summary, write_results  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
PORT = 50095


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_and_wait() -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--port", str(PORT)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return server, time.perf_counter() - started
            except grpc.RpcError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.01)


def exercise(target: str) -> None:
    from serving.grpc.client import RnnServeClient

    rng = np.random.default_rng(0)
    with RnnServeClient(target) as client:
        for index in range(100):
            client.classify("sentiment", [f"flight {index} was {'great' if index % 2 else 'late'}"] * 4)
            client.classify("topic", ["shares fell as the bank cut its forecast"])
        for _ in range(20):
            client.classify_audio("keywords", [rng.standard_normal(16000).astype(np.float32) * 0.01],
                                  sample_rate_hz=16000)
        list(client.stream("sentiment", ["a fine ", "day to fly"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "footprint.json")
    args = parser.parse_args()
    ready, rss_ready, rss_used = [], [], []
    for _ in range(args.repeats):
        server, seconds = start_and_wait()
        try:
            ready.append(seconds)
            rss_ready.append(rss_mib(server.pid))
            exercise(f"127.0.0.1:{PORT}")
            rss_used.append(rss_mib(server.pid))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    image = None
    if shutil.which("podman"):
        probe = subprocess.run(["podman", "image", "inspect", "-f", "{{.Size}}", "localhost/rnnserve:cpu"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            image = int(probe.stdout.strip()) / 1e6
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "models": sorted(p.name for p in (ROOT / "models").iterdir() if p.is_dir()), "repeats": args.repeats,
        "start_to_ready_s": summary(ready),
        "rss_ready_mib": statistics.median(rss_ready), "rss_after_requests_mib": statistics.median(rss_used),
        "image_mb": image,
    }
    write_results(args.output, report)
    print(f"start to ready: {report['start_to_ready_s']['median']:.2f} s (min {min(ready):.2f}, max {max(ready):.2f})")
    print(f"RSS ready {report['rss_ready_mib']:.0f} MiB, after requests {report['rss_after_requests_mib']:.0f} MiB")
    print(f"image: {image:.0f} MB" if image else "image: not built here (make container-test)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
