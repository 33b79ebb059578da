"""Pieces the benchmarks share: starting a server (rnnserve or a peer in its own venv), its CPU
time, and driving a closed-loop tritonclient load."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".bench-venvs"
# PyTriton's Python backend needs this interpreter's libpython.
LIBPYTHON = Path(sys.base_prefix) / "lib"


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
            server.log_path = log.name  # what the server logged (its metrics port, say)
            return server, f"127.0.0.1:{match.group(1)}"
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(Path(log.name).read_text()[-2000:])


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo = 0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            ticks += int(stats[current][11]) + int(stats[current][12])
        todo.extend(children.get(current, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port_block(count: int = 3) -> int:
    """A port p on 127.0.0.1 with p .. p + count - 1 all free now (peers bind gRPC, HTTP and
    metrics side by side)."""
    for base in range(20_000 + os.getpid() % 1000 * 10, 60_000, 10):
        sockets = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError(f"no {count} free ports in a row on 127.0.0.1")


def start_server(name: str, model: Path, port: int, work: Path, rnnserve_flags: tuple[str, ...] = (),
                 instances: int = 1, intra_op_threads: int = 0, parallel_workers: int = 0) -> subprocess.Popen:
    """One server on 127.0.0.1:port serving the ONNX file `model` as `lstm` (rnnserve: the
    repository three folders up, with rnnserve_flags); in its own session so that stop() ends its
    whole tree. PyTriton gets `instances` sessions of `intra_op_threads` threads (0: ONNX Runtime's
    default); MLServer gets `parallel_workers` worker processes (0: inference in the server process).
    "floor" is benchmarks/transport_only.py answering work/floor_response.bin to every ModelInfer.
    Its output goes to work/NAME.log."""
    handle = open(work / f"{name}.log", "w")
    if name == "floor":
        command = [sys.executable, str(ROOT / "benchmarks" / "transport_only.py"), "--port", str(port),
                   "--response", str(work / "floor_response.bin")]
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    if name == "rnnserve":
        command = [sys.executable, "-m", "serving", "serve", "--models", str(model.parent.parent.parent),
                   "--port", str(port), *rnnserve_flags]
        return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run bash benchmarks/setup_peers.sh")
    if name == "pytriton":
        environment = {**os.environ, "LD_LIBRARY_PATH": f"{LIBPYTHON}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        command = [str(python), str(ROOT / "benchmarks" / "peers" / "pytriton_server.py"), str(model), str(port),
                   str(instances), str(intra_op_threads)]
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True)
    folder = work / "mlserver"
    folder.mkdir(exist_ok=True)
    (folder / "mlserver_runtime.py").write_text((ROOT / "benchmarks" / "peers" / "mlserver_runtime.py").read_text())
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1",  # MLServer's default is 0.0.0.0 for its gRPC, HTTP and metrics servers
        "grpc_port": port, "http_port": port + 1, "metrics_port": port + 2, "parallel_workers": parallel_workers}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "lstm", "implementation": "mlserver_runtime.OnnxLstm", "max_batch_size": 32,
        "max_batch_time": 0.005, "parameters": {"uri": str(model), "extra": {"intra_op_threads": intra_op_threads}}}))
    return subprocess.Popen([str(VENVS / name / "bin" / "mlserver"), "start", str(folder)], cwd=folder,
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(target: str, process: subprocess.Popen, log: Path, model: str | None = "lstm",
               seconds: float = 180) -> None:
    """Until the KServe v2 ModelReady of `model` says yes (model None: until the port accepts a
    connection); raises with the log's tail when the process exits or time runs out."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(target) if model else None
    host, port = target.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-1500:]}")
        try:
            if client is None:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            if client.is_model_ready(model):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {seconds:g} s: {log.read_text()[-1500:]}")


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)  # every server runs in its own session
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


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


# Where a streaming server's time goes (benchmarks/streams.py and stream_load.py profiles).
STREAM_PROFILE_GROUPS = {
    "event loop thread (gRPC messages, handler, everything below)": "run_forever",
    "  stream handler (typed.py Stream)": "RnnServeServicer.Stream",
    "  audio chunk checks (limits only; decoding is on the step thread)": "AudioStream.job",
    "  typed responses (running label, posteriors, detections)": "_Reporter.add",
    "step batcher thread": "Batcher._instance",
    "  audio front end (PCM decode, resample, log-mel; every stream of a step at once)": "frontend_features",
    "  ONNX Runtime step calls": "Session.run",
    "  keyword detector (every audio row of a step at once)": "BatchDetector.update",
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
