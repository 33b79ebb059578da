"""Server CPU per unary call on each gRPC front (--grpc-front grpcio vs native), side by side.

    python benchmarks/fronts.py [--in-flight 16 --seconds 5 --repeats 3]

Two `rnnserve serve` processes on the bundled models, one per front (native with
--keepalive-max-ping-strikes 0, which it needs), same settings otherwise. One asyncio client
(grpc.aio, prebuilt request bytes, no client-side protobuf work) keeps IN_FLIGHT calls going for
SECONDS per window; the server's CPU time (user + system, every thread, from /proc/PID/stat) over
the window divided by the calls answered is its CPU per call. Two calls: KServe ServerLive (an
echo: no model work, the front and the servicer only) and ModelInfer of one short text on
`sentiment` (tokenising, batching and ONNX Runtime too). Fronts and calls interleave per repeat.
Writes benchmarks/results/fronts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_rnnserve, summary  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
SERVER_FLAGS = ["--models", str(ROOT / "models")]
FRONTS = {"grpcio": ["--grpc-front", "grpcio"],
          "native": ["--grpc-front", "native", "--keepalive-max-ping-strikes", "0"]}
METHOD = "/inference.GRPCInferenceService/"


def requests() -> dict[str, tuple[str, bytes]]:
    from serving.grpc.generated.inference import inference_pb2 as pb

    infer = pb.ModelInferRequest(model_name="sentiment")
    text = infer.inputs.add(name="text", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"what a wonderful flight, the crew was great")
    return {"ServerLive (echo)": (METHOD + "ServerLive", pb.ServerLiveRequest().SerializeToString()),
            "ModelInfer (sentiment, 1 text)": (METHOD + "ModelInfer", infer.SerializeToString())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def window(target: str, method: str, payload: bytes, in_flight: int, seconds: float, pid: int) -> dict:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        for _ in range(50):  # warm-up: connection, first batches
            await call(payload, timeout=30)
        calls, stop_at = 0, 0.0

        async def loop() -> None:
            nonlocal calls
            while time.perf_counter() < stop_at:
                await call(payload, timeout=30)
                calls += 1

        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(loop() for _ in range(in_flight)))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    return {"calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed, "server_cpu_s": cpu,
            "server_cores": cpu / elapsed, "cpu_us_per_call": 1e6 * cpu / max(calls, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fronts.json")
    args = parser.parse_args()
    calls = requests()
    servers = {front: start_rnnserve(*SERVER_FLAGS, *flags) for front, flags in FRONTS.items()}
    runs: dict[str, dict[str, list[dict]]] = {name: {front: [] for front in FRONTS} for name in calls}
    try:
        for repeat in range(args.repeats):
            for name, (method, payload) in calls.items():
                for front, (process, target) in servers.items():
                    result = asyncio.run(window(target, method, payload, args.in_flight, args.seconds, process.pid))
                    runs[name][front].append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {name:32s} {front:7s} {result['calls_per_s']:7.0f} calls/s "
                          f"{result['server_cores']:.2f} cores {result['cpu_us_per_call']:7.0f} us/call", flush=True)
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    table = {name: {front: {"cpu_us_per_call": summary([r["cpu_us_per_call"] for r in results]),
                            "calls_per_s": summary([r["calls_per_s"] for r in results])}
                    for front, results in by_front.items()}
             for name, by_front in runs.items()}
    print(f"\nserver CPU per call, median (min-max) of {args.repeats}, {args.in_flight} in flight:")
    for name, by_front in table.items():
        cells = [f"{front} {v['cpu_us_per_call']['median']:.0f} us ({v['cpu_us_per_call']['min']:.0f}-"
                 f"{v['cpu_us_per_call']['max']:.0f}), {v['calls_per_s']['median']:.0f}/s"
                 for front, v in by_front.items()]
        ratio = by_front["grpcio"]["cpu_us_per_call"]["median"] / by_front["native"]["cpu_us_per_call"]["median"]
        print(f"  {name}: {'; '.join(cells)}; grpcio/native {ratio:.1f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "in_flight": args.in_flight, "seconds": args.seconds, "repeats": args.repeats,
        "summary": table, "runs": runs,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
