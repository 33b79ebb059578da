"""Pieces the benchmarks share: starting a server and driving a closed-loop tritonclient load."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def summary(values: list[float]) -> dict:
    """{median, min, max} of a measure's repeats (empty when nothing was measured)."""
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def write_results(path: Path, report: dict) -> None:
    """A benchmark's results as indented JSON (benchmarks/results/NAME.json unless told otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def start_rnnserve(*flags: str) -> tuple[subprocess.Popen, str]:
    """`rnnserve serve --port 0 FLAGS` in its own process and session; returns it and its target
    once the log says which port it bound."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--port", "0", *flags], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", Path(log.name).read_text())
        if match:
            return server, f"127.0.0.1:{match.group(1)}"
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(Path(log.name).read_text()[-2000:])


def closed_loop(target: str, model: str, threads: int, seconds: float, make_input: Callable[[int], object],
                warmup_s: float = 3.0, on_window_start: Callable[[], None] | None = None) -> dict:
    """`threads` tritonclient threads, each sending its next request when the previous answer
    arrives; make_input(n) builds the n-th request's InferInput. Latencies count only after the
    warm-up; on_window_start() runs when the measured window begins."""
    import tritonclient.grpc as triton

    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    measuring = threading.Event()
    stop_at = time.perf_counter() + warmup_s + seconds

    def worker(index: int) -> None:
        client = triton.InferenceServerClient(target)
        count = 0
        while time.perf_counter() < stop_at:
            tensor = make_input(index * 1_000_003 + count)
            count += 1
            started = time.perf_counter()
            try:
                client.infer(model, [tensor])
            except Exception:  # counted in the report, never hidden
                errors[index] += 1
                continue
            if measuring.is_set():
                latencies[index].append(time.perf_counter() - started)
        client.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    time.sleep(warmup_s)
    if on_window_start is not None:
        on_window_start()
    measuring.set()
    window_start = time.perf_counter()
    for thread in workers:
        thread.join()
    window = time.perf_counter() - window_start
    values = np.array([v for per in latencies for v in per]) * 1000
    return {
        "clients": threads, "requests": int(len(values)), "throughput_rps": len(values) / window,
        "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
        "errors": int(sum(errors)), "window_s": window,
    }


def profile(pid: int, seconds: float, groups: dict[str, str]) -> dict | None:
    """py-spy samples of process `pid` for `seconds` (busy threads only); returns the share of
    samples whose stack passes through each group's frame name (a substring of py-spy's
    'function (file:line)'; 'self:NAME' counts only samples whose innermost frame starts with
    NAME), or None when py-spy is not installed or cannot attach."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        done = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                               "--format", "raw", "--nonblocking", "--output", out.name],
                              capture_output=True, text=True)
        text = Path(out.name).read_text() if done.returncode == 0 else ""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack, int(count)))
    total = sum(count for _, count in stacks)
    if not total:
        return None
    def share(frame: str) -> float:
        if frame.startswith("self:"):  # samples whose innermost frame is this one
            return sum(count for stack, count in stacks if stack.rsplit(";", 1)[-1].startswith(frame[5:])) / total
        return sum(count for stack, count in stacks if frame in stack) / total

    shares = {name: share(frame) for name, frame in groups.items()}
    return {"samples": total, "seconds": seconds, "shares": shares}
