"""Concurrent real-time audio streams: how many the keywords model sustains.

    python benchmarks/streams.py                         # cellular batching vs per-stream execution
    python benchmarks/streams.py --streams 50,100,200 --seconds 8

Each stream sends 100 ms PCM16 chunks at real-time pace (a chunk every 100 ms, from a
recording of spoken keywords) and asks for a response per chunk; a chunk's latency is the
time from sending it to receiving its response. A load level passes when the p99 chunk
latency stays <= 100 ms and no stream falls behind. The server runs in its own process with
`--stream-batch-max-rows 256` (cellular batching) and then `1` (each stream's step its own
ONNX Runtime call); the client is one asyncio process. Writes benchmarks/results/streams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport_only  # noqa: E402  (benchmarks/ is not a package)
from common import STREAM_PROFILE_GROUPS as PROFILE_GROUPS  # noqa: E402
from common import profile, start_rnnserve, summary, write_results  # noqa: E402
from recordings import keyword_recording, pcm16  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHUNK_S = 0.1
RATE = 16000


def recording() -> bytes:
    """PCM16 of the first benchmark recording: quiet noise with spoken keywords (recordings.py)."""
    samples, _ = keyword_recording(0, 6.0)
    return pcm16(samples)


async def one_stream(stub, pcm: bytes, seconds: float, started: float, latencies: list, lags: list) -> None:
    from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb

    chunk_bytes = int(RATE * CHUNK_S) * 2
    chunks = int(seconds / CHUNK_S)
    sent: list[float] = []

    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model="keywords", sample_rate_hz=RATE))
        for index in range(chunks):
            due = started + index * CHUNK_S
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            lags.append(time.perf_counter() - due)
            offset = (index * chunk_bytes) % (len(pcm) - chunk_bytes)
            sent.append(time.perf_counter())
            yield pb.StreamRequest(chunk=pb.StreamChunk(pcm16=pcm[offset : offset + chunk_bytes]))

    received = 0
    async for response in stub.Stream(requests()):
        if response.final:
            break
        latencies.append(time.perf_counter() - sent[received])
        received += 1


async def load(target: str, streams: int, seconds: float, pcm: bytes) -> dict:
    import grpc

    from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc

    latencies: list[float] = []
    lags: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rnnserve_pb2_grpc.RnnServeStub(channel)
        # Streams start spread over one chunk period, as independent clients would.
        started = time.perf_counter() + 0.5
        tasks = [one_stream(stub, pcm, seconds, started + (i / streams) * CHUNK_S, latencies, lags)
                 for i in range(streams)]
        await asyncio.gather(*tasks)
    values = np.array(latencies) * 1000
    return {
        "streams": streams, "chunks": len(values),
        "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
        "max_ms": float(values.max()), "client_send_lag_p99_ms": float(np.percentile(np.array(lags) * 1000, 99)),
    }


def measure(target: str, streams: int, seconds: float, repeats: int, pcm: bytes) -> dict:
    """`repeats` windows at one level; the level passes when the median p99 is <= 100 ms and the
    client kept pace (median p99 send lag <= 50 ms)."""
    windows = [asyncio.run(load(target, streams, seconds, pcm)) for _ in range(repeats)]

    result = {"streams": streams, "chunks": sum(w["chunks"] for w in windows),
              **{key: summary([w[key] for w in windows]) for key in ("p50_ms", "p99_ms", "client_send_lag_p99_ms")}}
    result["passed"] = result["p99_ms"]["median"] <= 100 and result["client_send_lag_p99_ms"]["median"] <= 50
    return result




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="20,40,60,80,100,125,150,200,300,400,500",
                        help="comma-separated load levels, tried in order until one fails")
    parser.add_argument("--transport-streams", default="100,200,300,400,500",
                        help="levels for the transport-only server (a ceiling: coarser steps)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "streams.json")
    args = parser.parse_args()
    pcm = recording()
    levels = [int(v) for v in args.streams.split(",")]
    transport_levels = [int(v) for v in args.transport_streams.split(",")]
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "chunk_ms": CHUNK_S * 1000,
              "seconds_per_level": args.seconds, "repeats": args.repeats, "modes": {}}
    modes = {"cellular batching": ("--stream-batch-max-rows", "256"),
             "per-stream execution": ("--stream-batch-max-rows", "1"), "transport only": None}
    for mode, flags in modes.items():
        server, target = transport_only.start() if flags is None else start_rnnserve(*flags, "--max-streams", "5000")
        results = []
        try:
            for streams in (transport_levels if flags is None else levels):
                result = measure(target, streams, args.seconds, args.repeats, pcm)
                results.append(result)
                verdict = "ok" if result["passed"] else "FAIL"
                print(f"{mode:<22} {streams:>4} streams: p50 {result['p50_ms']['median']:6.1f} ms  "
                      f"p99 {result['p99_ms']['median']:7.1f} ms ({result['p99_ms']['min']:.0f}-"
                      f"{result['p99_ms']['max']:.0f})  client lag p99 "
                      f"{result['client_send_lag_p99_ms']['median']:5.1f} ms  {verdict}", flush=True)
                if not result["passed"]:
                    break
            if mode == "cellular batching":
                # Where the time goes at the first level that fails (or the last one tried).
                level = results[-1]["streams"]
                recorder = threading.Thread(target=lambda pid=server.pid: report.__setitem__(
                    "profile", profile(pid, args.seconds - 1, PROFILE_GROUPS)))
                recorder.start()
                asyncio.run(load(target, level, args.seconds, pcm))
                recorder.join()
                if report.get("profile"):
                    report["profile"]["streams"] = level
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        passed = [r["streams"] for r in results if r["passed"]]
        report["modes"][mode] = {"levels": results, "max_streams": max(passed) if passed else 0}
    cellular = report["modes"]["cellular batching"]["max_streams"]
    single = report["modes"]["per-stream execution"]["max_streams"]
    report["ratio"] = cellular / single if single else None
    write_results(args.output, report)
    print(f"max real-time streams: cellular {cellular}, per-stream {single}, transport only "
          f"{report['modes']['transport only']['max_streams']}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
