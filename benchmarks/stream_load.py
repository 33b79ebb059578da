"""Concurrent real-time keyword streams driven by the compiled load generator (benchmarks/loadgen,
Go), so the client takes little of the CPU the server runs on.

    python benchmarks/stream_load.py                                # 10 ... 700 streams, every mode and server
    python benchmarks/stream_load.py --levels 50,100 --modes typed --seconds 8
    python benchmarks/stream_load.py --quick                        # 3 streams of 2.5 s (the test suite's run)
    python benchmarks/stream_load.py --build-only                   # only build benchmarks/loadgen/bin/loadgen

Every stream plays one of a few espeak-ng keyword recordings (recordings.py) once, in 100 ms
PCM16 chunks at real-time pace: typed RnnServe.Stream with a response per chunk, or a KServe v2
sequence over ModelStreamInfer. Two servers run side by side, levels interleaved: rnnserve
(`rnnserve serve`, its own process) and the transport-only server (transport_only.py). A level
passes when the p99 response latency is <= 100 ms, every stream kept pace (see the load
generator's doc) and every stream's detections (KServe: its running labels) equal those of the
same recording streamed alone on the same server. A server's levels stop at its first failure.
Writes benchmarks/results/stream_load.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport_only  # noqa: E402  (benchmarks/ is not a package)
from common import STREAM_PROFILE_GROUPS as PROFILE_GROUPS  # noqa: E402
from common import profile, start_rnnserve, write_results  # noqa: E402
from recordings import write_recordings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "benchmarks" / "loadgen"
BINARY = LOADGEN / "bin" / "loadgen"
SYSTEM_GOPATH = Path("/usr/share/gocode")
P99_LIMIT_MS = 100.0


class LoadgenUnavailable(RuntimeError):
    """The Go toolchain or Debian's Go gRPC sources are missing, or the build failed."""


def build_loadgen() -> Path:
    """Builds benchmarks/loadgen/bin/loadgen in GOPATH mode from the repository and Debian's Go
    packages alone (no module download: GOPROXY=off)."""
    go = shutil.which("go")
    if go is None or not (SYSTEM_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        raise LoadgenUnavailable("the Go toolchain or its gRPC sources are missing "
                                 "(Debian: apt-get install golang-go golang-google-grpc-dev)")
    environment = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "",
                   "GOPATH": f"{LOADGEN}:{SYSTEM_GOPATH}"}
    if "GOCACHE" not in environment and "HOME" not in environment and "XDG_CACHE_HOME" not in environment:
        environment["GOCACHE"] = str(BINARY.parent / ".cache")
    done = subprocess.run([go, "build", "-o", str(BINARY), "rnnserve/loadgen"], cwd=LOADGEN, env=environment,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise LoadgenUnavailable(f"go build failed:\n{done.stderr[-3000:]}")
    return BINARY


def run_loadgen(target: str, manifest: Path, mode: str, streams: int = 1, alone: bool = False,
                flags: tuple[str, ...] = ()) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [str(BINARY), "-target", target, "-manifest", str(manifest), "-mode", mode,
                   "-streams", str(streams), "-output", output.name, *flags]
        done = subprocess.run(command + (["-alone"] if alone else []), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(Path(output.name).read_text())


def outcome(stream: dict) -> list:
    """What a stream must reproduce: its detections (keyword, start, end), or its label runs."""
    if stream.get("labels"):
        return [(run["label"], run["responses"]) for run in stream["labels"]]
    return [(d["keyword"], round(d["start_ms"], 1), round(d["end_ms"], 1)) for d in stream["detections"]]


# What a mode name asks of the load generator: its -mode and flags. "typed" answers every chunk;
# "typed-1s" asks for report_every_ms 1000 (responses on detections and once a second);
# "kserve-unary": KServe sequences over unary ModelInfer calls (Triton's sequence batcher
# protocol), which the native front serves in Rust, where the streaming methods go through grpcio.
MODES = {"typed": ("typed", ()), "kserve": ("kserve", ()), "typed-1s": ("typed", ("-report-every-ms", "1000")),
         "kserve-unary": ("kserve-unary", ())}
# The servers a run can hold: rnnserve with cellular batching (every stream step waiting at one
# moment in one step.onnx call, up to 256 rows), rnnserve running each stream's step on its own
# (--stream-batch-max-rows 1) on the model's instances (--stream-instances 0: two step calls at
# once on 2 cores, per-stream execution's better setting), and the do-nothing transport-only server.
SERVERS = {"rnnserve": (), "rnnserve per-stream": ("--stream-batch-max-rows", "1", "--stream-instances", "0")}
# The modes each server runs (rnnserve: all): per-stream execution is compared on typed streams,
# the transport ceiling on both protocols.
SERVER_MODES = {"rnnserve per-stream": {"typed"}, "transport only": {"typed", "kserve"},
                "transport only (native)": {"kserve-unary"}}
TRANSPORT_ONLY = {"transport only": "grpcio", "transport only (native)": "native"}


def names_of(servers: str) -> list[str]:
    return [name.strip() for name in servers.split(",")]


def runs(server: str, mode: str) -> bool:
    return mode in SERVER_MODES.get(server, MODES)


def metrics_url(server) -> str | None:
    """The Prometheus URL a server started by start_rnnserve logged (None: not rnnserve)."""
    path = getattr(server, "log_path", None)
    match = path and re.search(r"Prometheus metrics on (http://\S+/metrics)", Path(path).read_text())
    return match.group(1) if match else None


def step_calls(url: str | None) -> tuple[float, float]:
    """(step.onnx calls, rows in them) so far for the keywords model, from the server's metrics."""
    if url is None:
        return 0.0, 0.0
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for name in ("count", "sum"):
        found = re.search(rf'^rnnserve_batch_rows_{name}{{model="keywords/step"}} (\S+)$', text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values["count"], values["sum"]


def level(target: str, manifest: Path, mode: str, streams: int, reference: dict[int, list],
          flags: tuple[str, ...], metrics: str | None = None) -> dict:
    loadgen_mode, mode_flags = MODES[mode]
    calls_before, rows_before = step_calls(metrics)
    summary = run_loadgen(target, manifest, loadgen_mode, streams, flags=flags + mode_flags)
    calls_after, rows_after = step_calls(metrics)
    per_stream = summary["per_stream"]
    differing = [s["stream"] for s in per_stream if outcome(s) != reference[s["recording"]]]
    latency = summary["latency_ms"] or {}
    result = {
        "streams": streams, "responses": summary["responses"],
        **{f"{q}_ms": latency.get(q) for q in ("p50", "p90", "p99", "max")},
        "streams_kept_pace": summary["streams_kept_pace"], "behind": summary["behind"],
        "max_send_lag_ms": summary["max_send_lag_ms"], "detections_equal": streams - len(differing),
        "differing_streams": differing[:10], "keyword_latency_ms": summary["keyword_latency_ms"],
        "keywords_spoken": summary["keywords_spoken"], "keywords_missed": summary["keywords_missed"],
        "stream_errors": summary["stream_errors"], "first_error": summary.get("first_error", ""),
        "wall_s": summary["wall_s"], "client_cpu_s": summary["client_cpu_s"],
        "step_calls": calls_after - calls_before,
        "rows_per_step_call": round((rows_after - rows_before) / (calls_after - calls_before), 2)
        if calls_after > calls_before else None,
    }
    result["passed"] = (latency.get("p99") is not None and latency["p99"] <= P99_LIMIT_MS
                        and summary["all_kept_pace"] and not differing and not summary["stream_errors"])
    return result


def describe(server: str, mode: str, result: dict) -> str:
    keyword = result["keyword_latency_ms"]
    return (f"{server:<15} {mode:<6} {result['streams']:>4} streams: p50 {result['p50_ms'] or 0:6.1f} ms  "
            f"p99 {result['p99_ms'] or 0:7.1f} ms  kept pace {result['streams_kept_pace']}/{result['streams']}  "
            f"detections equal {result['detections_equal']}/{result['streams']}"
            + (f"  keyword->detection p50 {keyword['p50']:.0f} ms" if keyword else "")
            + (f"  {result['rows_per_step_call']:.1f} rows/step call" if result.get("rows_per_step_call") else "")
            + f"  client CPU {result['client_cpu_s']:.2f} s  {'ok' if result['passed'] else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="10,25,50,75,100,150,200,300,500,700",
                        help="comma-separated stream counts")
    parser.add_argument("--modes", default="typed,kserve,typed-1s,kserve-unary",
                        help="typed (RnnServe.Stream, a response per chunk), kserve (sequences over "
                             "ModelStreamInfer), typed-1s (report_every_ms 1000: responses on detections and once "
                             "a second), kserve-unary (sequences over unary ModelInfer calls)")
    parser.add_argument("--servers", default="rnnserve,rnnserve per-stream,transport only,transport only (native)",
                        help="rnnserve (cellular batching), rnnserve per-stream (--stream-batch-max-rows 1 "
                             "--stream-instances 0), transport only (grpc.aio), transport only (native: "
                             "pygrpc-native, unary sequences)")
    parser.add_argument("--recordings", type=int, default=4, help="distinct recordings the streams play")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each recording (one stream)")
    parser.add_argument("--connections", type=int, default=0,
                        help="connections the streams share (0: one per stream, as independent clients)")
    parser.add_argument("--start-groups", type=int, default=0,
                        help="start the streams in this many groups (0: each its own start; with shared "
                             "connections a group's chunks share writes, which costs the client less CPU)")
    parser.add_argument("--quick", action="store_true", help="3 streams, 2 recordings of 2.5 s (the test suite's run)")
    parser.add_argument("--build-only", action="store_true", help="build the load generator and stop")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "stream_load.json")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.recordings, args.seconds = "3", 2, 2.5
    try:
        build_loadgen()
    except LoadgenUnavailable as error:
        print(f"stream_load: {error}", file=sys.stderr)
        if args.build_only:
            return 1
        # `rnnserve bench` goes on; the report says why this part is missing.
        write_results(args.output, {"unavailable": str(error)})
        return 0
    if args.build_only:
        print(f"built {BINARY.relative_to(ROOT)}")
        return 0
    levels = [int(v) for v in args.levels.split(",")]
    flags = ("-connections", str(args.connections), "-start-groups", str(args.start_groups))
    modes = [m.strip() for m in args.modes.split(",")]
    known_servers = [*SERVERS, *TRANSPORT_ONLY]
    unknown = [m for m in modes if m not in MODES] + [n for n in names_of(args.servers) if n not in known_servers]
    if unknown:
        parser.error(f"unknown mode or server: {', '.join(unknown)} (modes: {', '.join(MODES)}; "
                     f"servers: {', '.join(known_servers)})")
    starters = {name: functools.partial(start_rnnserve, "--max-streams", "5000", "--metrics-port", "0", *extra)
                for name, extra in SERVERS.items()}
    for name, front in TRANSPORT_ONLY.items():
        starters[name] = functools.partial(transport_only.start, front)
    names = names_of(args.servers)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "client": "benchmarks/loadgen (Go)",
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "chunk_ms": 100, "recordings": args.recordings, "seconds_per_stream": args.seconds,
              "p99_limit_ms": P99_LIMIT_MS, "connections": args.connections, "start_groups": args.start_groups,
              "servers": {}}
    servers = {}
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_recordings(Path(folder), args.recordings, args.seconds)
        try:
            for name in names:
                if TRANSPORT_ONLY.get(name) == "native" and importlib.util.find_spec("pygrpc_native") is None:
                    print(f"stream_load: {name}: pygrpc-native is not installed (rnnserve[native]); skipped")
                    continue
                servers[name] = starters[name]()
            references = {(name, mode): {s["recording"]: outcome(s) for s in
                                         run_loadgen(target, manifest, MODES[mode][0], alone=True,
                                                     flags=MODES[mode][1])["per_stream"]}
                          for name, (_, target) in servers.items() for mode in modes if runs(name, mode)}
            failed: set[tuple[str, str]] = set()
            for streams in levels:
                for mode in modes:
                    for name, (process, target) in servers.items():
                        if (name, mode) in failed or not runs(name, mode):
                            continue
                        result = level(target, manifest, mode, streams, references[(name, mode)], flags,
                                       metrics_url(process))
                        report["servers"].setdefault(name, {}).setdefault(mode, {"levels": []})["levels"].append(result)
                        print(describe(name, mode, result), flush=True)
                        if not result["passed"]:
                            failed.add((name, mode))
            # Where rnnserve's time goes at its first failing typed level (or the last one tried),
            # with the compiled client: one more run of that level with py-spy attached.
            typed = report["servers"].get("rnnserve", {}).get("typed")
            if typed and not args.quick:
                process, target = servers["rnnserve"]
                at = typed["levels"][-1]["streams"]
                recorder = threading.Thread(target=lambda: report.__setitem__(
                    "profile", profile(process.pid, max(2.0, args.seconds - 3), PROFILE_GROUPS)))
                loader = threading.Thread(target=run_loadgen, args=(target, manifest, "typed", at),
                                          kwargs={"flags": flags})
                loader.start()
                time.sleep(1.0)  # the streams are open and paced
                recorder.start()
                recorder.join()
                loader.join()
                if report.get("profile"):
                    report["profile"]["streams"] = at
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    for by_mode in report["servers"].values():
        for data in by_mode.values():
            passed = [r["streams"] for r in data["levels"] if r["passed"]]
            data["max_streams"] = max(passed) if passed else 0
    write_results(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
