"""rnnserve against PyTriton (a real Triton server) and MLServer on the same ONNX file, same
load, same machine, one run.

    bash benchmarks/setup_peers.sh          # once: the peers' own venvs under .bench-venvs/
    python benchmarks/peers.py [--repeats 3 --seconds 15]

The model is benchmarks/peer_model.py's plain LSTM classifier (`ids` INT64 [B, 64] ->
`logits` FP32 [B, 3]). Every server batches dynamically with max batch 32 and a 5 ms queue
delay, runs ONNX Runtime on the CPU, and gets the same closed-loop tritonclient load: 32
threads, single-row requests, 3 s warm-up, then --seconds measured. Server CPU is the
user+system time of the server's process tree over the measured window, in cores.
A peer whose venv is missing or that fails to start is reported as such, not dropped.
Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import closed_loop, profile, start_server, stop, summary, tree_cpu_seconds, wait_ready, write_results  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
THREADS, WARMUP_S = 32, 3.0
RNNSERVE_FLAGS = ("--batch-max-rows", "32", "--batch-max-delay-ms", "5")


def drive(target: str, seconds: float, on_window_start=None) -> dict:
    """The race's load: THREADS closed-loop clients, one random row of ids per request."""
    import tritonclient.grpc as triton

    rows = np.random.default_rng(0).integers(0, 20_000, size=(256, 64), dtype=np.int64)

    def make_input(n: int):
        tensor = triton.InferInput("ids", [1, 64], "INT64")
        tensor.set_data_from_numpy(rows[n % 256][None])
        return tensor

    return closed_loop(target, "lstm", THREADS, seconds, make_input, WARMUP_S, on_window_start)


PROFILE_GROUPS = {
    "event loop thread (gRPC messages, request checks, responses)": "run_forever",
    "  in grpc.aio's compiled core (callbacks without a Python frame)": "self:Handle._run (asyncio",
    "  waiting in epoll": "self:EpollSelector.select",
    "grpc.aio's poller thread (compiled, no Python frame)": "self:Thread.run (threading",
    "batcher thread": "Batcher._work",
    "  ONNX Runtime calls": "Session.run",
}


def model_alone(model: Path, seconds: float = 3.0) -> dict:
    """The ONNX file at batch 32 in a warm ONNX Runtime loop, nothing else running: rows/s with
    the default threads, and CPU milliseconds per row on one thread (the least any server pays)."""
    import onnxruntime

    rows = np.random.default_rng(1).integers(0, 20_000, size=(32, 64), dtype=np.int64)
    result = {}
    for threads in (0, 1):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        session.run(None, {"ids": rows})
        calls, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            session.run(None, {"ids": rows})
            calls += 1
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if threads == 0:
            result["rows_per_s"] = calls * 32 / wall
        else:
            result["cpu_ms_per_row_one_thread"] = cpu * 1000 / (calls * 32)
    return result


def start(name: str, model: Path, port: int, work: Path) -> subprocess.Popen:
    # MLServer with parallel_workers 0 (inference in the server process), as in every earlier run
    # of this view; servers.py measures it with parallel workers too.
    return start_server(name, model, port, work, rnnserve_flags=RNNSERVE_FLAGS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--servers", default="rnnserve,pytriton,mlserver")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    args = parser.parse_args()
    from peer_model import build

    work = Path(tempfile.mkdtemp(prefix="rnnserve-peers-"))
    model = build(work / "repo" / "lstm" / "1" / "model.onnx")
    servers = args.servers.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    failures: dict[str, str] = {}
    for repeat in range(args.repeats):
        for offset, name in enumerate(servers):
            if name in failures:
                continue
            port = 8300 + 10 * offset
            try:
                process = start(name, model, port, work)
            except FileNotFoundError as error:
                failures[name] = str(error)
                continue
            try:
                wait_ready(f"127.0.0.1:{port}", process, work / f"{name}.log")
                cpu: list[float] = []
                client: list[float] = []

                def mark(pid=process.pid, into=cpu, own=client) -> None:
                    into.append(tree_cpu_seconds(pid))
                    own.append(sum(os.times()[:2]))

                result = drive(f"127.0.0.1:{port}", args.seconds, mark)
                cpu.append(tree_cpu_seconds(process.pid))
                client.append(sum(os.times()[:2]))
                result["server_cpu_cores"] = (cpu[1] - cpu[0]) / result["window_s"]
                result["client_cpu_cores"] = (client[1] - client[0]) / result["window_s"]
                runs[name].append(result)
                print(f"repeat {repeat + 1} {name:<9} {result['throughput_rps']:7.0f} req/s"
                      f"  p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms"
                      f"  server CPU {result['server_cpu_cores']:.2f} cores  errors {result['errors']}", flush=True)
            except RuntimeError as error:
                failures[name] = str(error)
                print(f"{name}: {error}", flush=True)
            finally:
                stop(process)

    # Where rnnserve's time goes under this load: one more window with py-spy attached.
    rnnserve_profile = None
    if "rnnserve" in runs and runs["rnnserve"]:
        process = start("rnnserve", model, 8300, work)
        try:
            wait_ready("127.0.0.1:8300", process, work / "rnnserve.log")
            recorder: dict = {}

            def begin(pid=process.pid) -> None:
                recorder["thread"] = threading.Thread(target=lambda: recorder.__setitem__(
                    "profile", profile(pid, args.seconds - 2, PROFILE_GROUPS)))
                recorder["thread"].start()

            drive("127.0.0.1:8300", args.seconds, begin)
            recorder["thread"].join()
            rnnserve_profile = recorder.get("profile")
        finally:
            stop(process)

    # The same load on the same tensors with no model behind them: the server's own cost.
    trivial = None
    if "rnnserve" in runs and runs["rnnserve"]:
        from peer_model import build_trivial

        process = start("rnnserve", build_trivial(work / "trivial" / "lstm" / "1" / "model.onnx"), 8300, work)
        try:
            wait_ready("127.0.0.1:8300", process, work / "rnnserve.log")
            cpu = []
            trivial = drive("127.0.0.1:8300", args.seconds, lambda pid=process.pid: cpu.append(tree_cpu_seconds(pid)))
            cpu.append(tree_cpu_seconds(process.pid))
            trivial["server_cpu_ms_per_request"] = (cpu[1] - cpu[0]) * 1000 / trivial["requests"]
            print(f"rnnserve, no model behind the tensors: {trivial['throughput_rps']:.0f} req/s, server CPU "
                  f"{trivial['server_cpu_ms_per_request']:.2f} ms per request", flush=True)
        finally:
            stop(process)

    table = {}
    for name, results in runs.items():
        if results:
            table[name] = {key: summary([r[key] for r in results])
                           for key in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_cores", "client_cpu_cores")}
            table[name]["errors"] = sum(r["errors"] for r in results)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load": {"threads": THREADS, "rows_per_request": 1, "warmup_s": WARMUP_S, "seconds": args.seconds,
                 "repeats": args.repeats},
        "model": "LSTM classifier: vocab 20000, embedding 128, hidden 256, 3 outputs, ids INT64 [B, 64]",
        "servers": table, "failures": failures, "runs": runs, "model_alone": model_alone(model),
        "rnnserve_trivial_model": trivial,
        "profile": rnnserve_profile and {**rnnserve_profile, "clients": THREADS},
    }
    if "rnnserve" in table and "pytriton" in table:
        report["rnnserve_vs_pytriton_throughput"] = (
            table["rnnserve"]["throughput_rps"]["median"] / table["pytriton"]["throughput_rps"]["median"])
    write_results(args.output, report)
    for name, row in table.items():
        print(f"{name:<9} median {row['throughput_rps']['median']:7.0f} req/s, p99 {row['p99_ms']['median']:6.1f} ms,"
              f" CPU {row['server_cpu_cores']['median']:.2f} cores")
    for name, reason in failures.items():
        print(f"{name}: not measured: {reason[:300]}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
