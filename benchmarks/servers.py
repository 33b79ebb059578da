"""Servers measured at the server, not through a Python client: rnnserve (each gRPC front, a few
settings), PyTriton (1 and N instances), MLServer (with and without parallel workers) and a bare
grpc.aio server that does no work, all under the same h2load load, in one run, against the
model's in-process ceiling measured in the same run.

    bash benchmarks/setup_peers.sh                           # once: the peers' venvs and h2load
    python benchmarks/servers.py                             # everything, 3 repeats x 12 s windows (~15 min)
    python benchmarks/servers.py --quick --servers rnnserve,floor   # a smoke run of a few seconds each
    python benchmarks/servers.py --fronts grpcio,native      # rnnserve's fronts (default: what serve offers)

The model is benchmarks/peer_model.py's LSTM (vocab 20k, embedding 128, hidden 256, T=64) as
`lstm`; every request is the same prebuilt ModelInfer body of one row (h2load.py), with
--in-flight requests outstanding over --connections HTTP/2 connections, --warmup-s unmeasured,
then --seconds measured. Server CPU is the user+system time of the server's process tree over
the measured window. The ceiling is the model alone in ONNX Runtime, the best of sessions x
threads x batch (ceiling.py). Then the bundled `sentiment` over the KServe v2 text path (`text`
BYTES [1], one fixed text), served with each front's best LSTM settings, against its own
ceiling, tokenisation included. Configurations interleave per repeat; a server that cannot be
installed, started or does not answer with grpc-status 0 is reported with the reason. Exits 1
when rnnserve or the floor fails (a peer's failure is the peer's). Writes
benchmarks/results/servers.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ceiling  # noqa: E402  (benchmarks/ is not a package)
import h2load  # noqa: E402
from common import free_port_block, start_server, stop, summary, tree_cpu_seconds, wait_ready, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = "my bags were lost again and nobody at the desk could tell me where they are"
MEASURES = ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_cores", "server_cpu_ms_per_request", "client_cpu_cores")
SERVERS = ("rnnserve", "pytriton", "mlserver", "floor", "text")


@dataclass(frozen=True)
class Config:
    """One server with one set of settings; `group` names its row in the best-per-server table."""

    server: str
    group: str
    label: str
    flags: tuple[str, ...] = ()
    instances: int = 1
    intra_op_threads: int = 0
    parallel_workers: int = 0


def offered_fronts() -> list[str] | None:
    """The gRPC fronts this rnnserve offers, auto (a choice among them) left out; None when
    `rnnserve serve --help` has no --grpc-front. The values come from serve's own refusal of
    one it does not know (it checks settings before loading anything)."""
    serve = [sys.executable, "-m", "serving", "serve"]
    help_text = subprocess.run([*serve, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    if not re.search(r"^\s+--grpc-front\b", help_text, re.MULTILINE):
        return None
    refusal = subprocess.run([*serve, "--grpc-front", "?", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stderr
    listed = refusal.split("should be", 1)[1] if "should be" in refusal else ""
    return [name for name in re.findall(r"'([\w-]+)'", listed) if name != "auto"] or ["grpcio", "native"]


def rnnserve_configs(cores: int, fronts: list[str] | None, extra: tuple[str, ...] = ()) -> list[Config]:
    """rnnserve's settings to try, for every front, each with `extra` flags appended."""
    delay = ("--batch-max-delay-ms", "5")
    settings = {
        "defaults": (),
        f"1 instance x {cores} threads, batch 32": ("--instances", "1", "--intra-op-threads", str(cores),
                                                    "--batch-max-rows", "32", *delay),
        f"{cores} instances x 1 thread, batch 16": ("--instances", str(cores), "--intra-op-threads", "1",
                                                    "--batch-max-rows", "16", "--batch-preferred-rows", "16", *delay),
    }
    if cores > 1:
        settings[f"{cores} workers x 1 instance x 1 thread, batch 16"] = (
            "--workers", str(cores), "--instances", "1", "--intra-op-threads", "1", "--batch-max-rows", "16", *delay)
    configs = []
    for front in fronts or [None]:
        group = f"rnnserve, {front} front" if front else "rnnserve"
        front_flags = ("--grpc-front", front) if front else ()
        configs += [Config("rnnserve", group, f"{group}: {label}", (*flags, *front_flags, *extra))
                    for label, flags in settings.items()]
    return configs


def peer_configs(cores: int, servers: list[str]) -> list[Config]:
    configs = {
        "pytriton": [Config("pytriton", "PyTriton", "PyTriton: 1 instance, ONNX Runtime's default threads"),
                     Config("pytriton", "PyTriton", f"PyTriton: {cores} instances x 1 thread", instances=cores,
                            intra_op_threads=1)],
        "mlserver": [Config("mlserver", "MLServer", "MLServer: no parallel workers (inference in the server process)"),
                     Config("mlserver", "MLServer", f"MLServer: {cores} parallel workers x 1 thread",
                            intra_op_threads=1, parallel_workers=cores)],
        "floor": [Config("floor", "transport floor", "bare grpc.aio answering fixed bytes, no work")],
    }
    return [config for name in servers if name in configs for config in configs[name]]


def measure(config: Config, model: Path, body: Path, work: Path, args: argparse.Namespace, ready_model: str) -> dict:
    """Start the server, wait until ready, check its answer to the body, one h2load window with
    the server tree's CPU time read at both ends, check again, stop it."""
    port = free_port_block(3)
    target = f"127.0.0.1:{port}"
    process = start_server(config.server, model, port, work, config.flags, config.instances, config.intra_op_threads,
                           config.parallel_workers)
    try:
        wait_ready(target, process, work / f"{config.server}.log", None if config.server == "floor" else ready_model)
        response_bytes = len(h2load.probe(target, body))
        marks: list[tuple[float, float]] = []

        def mark() -> None:
            marks.append((time.perf_counter(), tree_cpu_seconds(process.pid)))

        result = h2load.run(target, body, response_bytes, args.in_flight, args.connections, args.warmup_s,
                            args.seconds, mark, mark)
        h2load.probe(target, body)  # still answering correctly after the load
    finally:
        stop(process)
    (start_s, start_cpu), (end_s, end_cpu) = marks
    result["server_cpu_cores"] = (end_cpu - start_cpu) / (end_s - start_s)
    result["server_cpu_ms_per_request"] = result["server_cpu_cores"] * 1000 / result["throughput_rps"]
    return result


def race(configs: list[Config], model: Path, body: Path, work: Path, args: argparse.Namespace, ready_model: str,
         before_repeat=None) -> tuple[dict, dict]:
    """Every config once per repeat, interleaved: ({label: config, summary, runs}, {label: reason})."""
    runs: dict[str, list[dict]] = {config.label: [] for config in configs}
    failures: dict[str, str] = {}
    for repeat in range(args.repeats):
        if before_repeat is not None:
            before_repeat()
        for config in configs:
            if config.label in failures:
                continue
            try:
                result = measure(config, model, body, work, args, ready_model)
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
                failures[config.label] = f"{type(error).__name__}: {error}"
                print(f"FAILED {config.label}: {str(error)[:500]}", file=sys.stderr, flush=True)
                continue
            runs[config.label].append(result)
            print(f"repeat {repeat + 1} {config.label}: {result['throughput_rps']:,.0f} req/s, p50 "
                  f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, server CPU "
                  f"{result['server_cpu_cores']:.2f} cores ({result['server_cpu_ms_per_request']:.2f} ms/request), "
                  f"h2load {result['client_cpu_cores']:.2f} cores, errors {result['errors']}", flush=True)
    table = {}
    for config in configs:
        results = runs[config.label]
        if results and config.label not in failures:
            table[config.label] = {"config": asdict(config), "runs": results,
                                   "summary": {key: summary([r[key] for r in results]) for key in MEASURES},
                                   "errors": sum(r["errors"] for r in results)}
    return table, failures


def best_per_group(table: dict) -> dict[str, str]:
    """{group: label of its configuration with the highest median req/s}."""
    best: dict[str, str] = {}
    for label, row in table.items():
        group = row["config"]["group"]
        if group not in best or (row["summary"]["throughput_rps"]["median"]
                                 > table[best[group]]["summary"]["throughput_rps"]["median"]):
            best[group] = label
    return best


class CeilingRuns:
    """The in-process ceiling's grid, run once per repeat between the servers' windows."""

    def __init__(self, measure, cores: int, batches: tuple[int, ...] = (16, 32)):
        self.measure, self.cores, self.batches = measure, cores, batches
        self.values: dict[str, list[float]] = {}

    def __call__(self) -> None:
        for label, rows_per_s in ceiling.grid(self.measure, self.cores, self.batches).items():
            self.values.setdefault(label, []).append(rows_per_s)

    def table(self) -> dict:
        """{best: label, tried: {label: summary of rows/s}}."""
        tried = {label: summary(values) for label, values in self.values.items()}
        return {"best": max(tried, key=lambda label: tried[label]["median"]) if tried else None, "tried": tried}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repeat, 1 s warm-up, 2 s windows, the first settings of each server")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seconds", type=float, help="measured window (default 12)")
    parser.add_argument("--warmup-s", type=float, help="unmeasured load before each window (default 3)")
    parser.add_argument("--in-flight", type=int, default=32, help="requests outstanding at all times (default 32)")
    parser.add_argument("--connections", type=int, default=8, help="HTTP/2 connections (default 8)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--fronts", help="rnnserve's --grpc-front values to compare (default: all serve offers)")
    parser.add_argument("--rnnserve-flags", default="", help="flags added to every rnnserve configuration, e.g. "
                        "'--keepalive-max-ping-strikes 0' (shown in the report)")
    parser.add_argument("--ceiling-seconds", type=float, help="per ceiling configuration (default 3)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "servers.json")
    args = parser.parse_args()
    defaults = (1, 2.0, 1.0, 0.5) if args.quick else (3, 12.0, 3.0, 3.0)
    for name, value in zip(("repeats", "seconds", "warmup_s", "ceiling_seconds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    offered = offered_fronts()
    if unknown:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(SERVERS)}")
    if args.fronts and offered is None:
        parser.error("--fronts: this rnnserve serve has no --grpc-front")
    fronts = args.fronts.split(",") if args.fronts else offered
    cores = os.cpu_count() or 1
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": cores, "python": platform.python_version()},
        "load": {"tool": "h2load", "in_flight": args.in_flight, "connections": args.connections,
                 "streams_per_connection": args.in_flight // args.connections, "rows_per_request": 1,
                 "warmup_s": args.warmup_s, "seconds": args.seconds, "repeats": args.repeats, "quick": args.quick},
        "model": "LSTM classifier: vocab 20000, embedding 128, hidden 256, 3 outputs, ids INT64 [B, 64]",
        "fronts": fronts, "front_flag": offered is not None,
    }
    missing = h2load.missing_tools()
    if missing:
        report["unavailable"] = f"{' and '.join(missing)} not installed (Debian: nghttp2-client, curl)"
        print(f"servers.py: not measured: {report['unavailable']}", file=sys.stderr)
        return write(args.output, report, 0)
    report["machine"]["h2load"] = h2load.version()
    from peer_model import build

    work = Path(tempfile.mkdtemp(prefix="rnnserve-servers-"))
    model = build(work / "repo" / "lstm" / "1" / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 20_000, size=(1, 64), dtype=np.int64)
    body = work / "lstm.body"
    body.write_bytes(h2load.ids_body("lstm", ids))
    import onnxruntime

    logits = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    (work / "floor_response.bin").write_bytes(h2load.logits_response("lstm", logits))
    configs = (rnnserve_configs(cores, fronts, tuple(args.rnnserve_flags.split())) if "rnnserve" in servers else [])
    configs += peer_configs(cores, servers)
    if args.quick:  # the first settings of each group
        configs = [config for index, config in enumerate(configs)
                   if all(other.group != config.group for other in configs[:index])]
    lstm_ceiling = CeilingRuns(lambda s, t, b: ceiling.lstm(model, s, t, b, args.ceiling_seconds), cores)
    table, failures = race(configs, model, body, work, args, "lstm", lstm_ceiling)
    report.update(ceiling=lstm_ceiling.table(), configs=table, failures=failures, best=best_per_group(table))
    ours = [config for config in configs if config.server in ("rnnserve", "floor")]
    if "text" in servers and "rnnserve" in servers:
        text_configs, report["text"] = text_path(table, report["best"], work, args, cores)
        ours += text_configs
        failures = {**failures, **report["text"]["failures"]}
    return write(args.output, report, 1 if any(config.label in failures for config in ours) else 0)


def text_path(table: dict, best: dict, work: Path, args: argparse.Namespace, cores: int) -> tuple[list[Config], dict]:
    """sentiment over the KServe v2 text path with each front's best LSTM settings, against its
    own ceiling (tokenisation included), both in every repeat."""
    repository = work / "text-repo"
    shutil.copytree(ROOT / "models" / "sentiment", repository / "sentiment")
    version = max((repository / "sentiment").iterdir(), key=lambda path: int(path.name))
    body = work / "sentiment.body"
    body.write_bytes(h2load.text_body("sentiment", TEXT))
    configs = [Config("rnnserve", group, f"sentiment, {label}", tuple(table[label]["config"]["flags"]))
               for group, label in best.items() if group.startswith("rnnserve")]
    text_ceiling = CeilingRuns(lambda s, t, b: ceiling.text_model(repository, "sentiment", TEXT, s, t, b,
                                                                  args.ceiling_seconds), cores)
    text_table, text_failures = race(configs, version / "model.onnx", body, work, args, "sentiment", text_ceiling)
    return configs, {"model": "sentiment", "text": TEXT, "ceiling": text_ceiling.table(), "configs": text_table,
                     "failures": text_failures, "best": best_per_group(text_table)}


def write(path: Path, report: dict, status: int) -> int:
    report["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_results(path, report)
    print(f"wrote {path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
