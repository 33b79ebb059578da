"""Unary serving: throughput and latency against concurrency, dynamic batching on and off.

    python benchmarks/unary.py [--clients 1,4,16,32,64 --seconds 8]

The bundled `sentiment` model through the KServe v2 API (tritonclient, one text per
request, closed loop: each client thread sends its next request when the previous answer
arrives). The server runs with dynamic batching on (max 32 rows, 5 ms delay) and off (one row
per ONNX Runtime call, no delay), each in its own process; levels interleave per repeat.
Writes benchmarks/results/unary.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import closed_loop, start_rnnserve, summary, write_results  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
WARMUP_S = 1.0
TEXTS = ["what a wonderful flight, the crew was great", "my bags were lost again", "is the 6pm flight on time?",
         "thanks for the upgrade, made my week", "two hours on the tarmac and no explanation"]
MODES = {"batching on": ["--batch-max-rows", "32", "--batch-max-delay-ms", "5"],
         "batching off": ["--batch-max-rows", "1", "--batch-max-delay-ms", "0"]}


def drive(target: str, clients: int, seconds: float) -> dict:
    import tritonclient.grpc as triton

    def make_input(n: int):
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([TEXTS[n % len(TEXTS)].encode()], dtype=object))
        return tensor

    return closed_loop(target, "sentiment", clients, seconds, make_input, WARMUP_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16,32,64")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "unary.json")
    args = parser.parse_args()
    levels = [int(v) for v in args.clients.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {mode: {level: [] for level in levels} for mode in MODES}
    servers = {mode: start_rnnserve(*flags) for mode, flags in MODES.items()}
    try:
        for _ in range(args.repeats):
            for level in levels:
                for mode in MODES:
                    result = drive(servers[mode][1], level, args.seconds)
                    runs[mode][level].append(result)
                    print(f"{mode:<13} {level:>3} clients: {result['throughput_rps']:7.0f} req/s  "
                          f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  errors {result['errors']}",
                          flush=True)
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    table = {mode: {str(level): {key: summary([r[key] for r in results])
                                 for key in ("throughput_rps", "p50_ms", "p99_ms")}
                    for level, results in per_level.items()}
             for mode, per_level in runs.items()}
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": "sentiment",
              "seconds": args.seconds, "repeats": args.repeats, "modes": {m: MODES[m] for m in MODES},
              "summary": table, "runs": {m: {str(k): v for k, v in r.items()} for m, r in runs.items()}}
    write_results(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
