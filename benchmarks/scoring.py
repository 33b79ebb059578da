"""Batch scoring throughput and memory, side by side in one run.

    python benchmarks/scoring.py                       # 100k rows for speed, 1M rows for memory
    python benchmarks/scoring.py --rows 50000 --memory-rows 200000 --repeats 1 --skip-ray

Measures, on one generated text file scored with the bundled sentiment model:
- the in-process ceiling: the data plane's own classify on batches of 256 already in memory
  (tokenise + ONNX Runtime + softmax, nothing else);
- `rnnserve score` in-process, against a local server (`--server`), and on a local Ray
  (`--engine ray`), each as its own process, wall time from launch to exit;
- peak RSS of `rnnserve score` in-process on a file of --memory-rows rows (it streams, so it
  should not grow with the file).
Writes benchmarks/results/scoring.json and prints a table; every number comes from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_rnnserve, summary, write_results  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the flight crew was great awful delayed again lost my bags thanks lovely seat food service app "
         "crashing never fly with you cancelled ok gate agent rude helpful refund").split()
# Runs `rnnserve score` and reports its own peak RSS (ru_maxrss, KiB on Linux) on stderr.
LAUNCHER = ("import resource, sys; from serving.cli import main; rc = main(sys.argv[1:]); "
            "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr); "
            "sys.exit(rc)")


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))) + "\n")


def ceiling(path: Path, batch: int = 256) -> float:
    from serving.dataplane import DataPlane
    from serving.repository import load_repository

    lines = path.read_text().splitlines()
    plane = DataPlane(load_repository(ROOT / "models", only={"sentiment"}), batching=None)
    plane.classify_texts("sentiment", "", lines[:batch])
    started = time.perf_counter()
    for start in range(0, len(lines), batch):
        plane.classify_texts("sentiment", "", lines[start : start + batch])
    seconds = time.perf_counter() - started
    plane.close()
    return len(lines) / seconds


def run_cli(arguments: list[str]) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, "score", *arguments], cwd=ROOT, capture_output=True,
                            text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"rnnserve score {' '.join(arguments)} failed:\n{result.stderr[-2000:]}")
    rss = int(re.search(r"peak_rss_kib=(\d+)", result.stderr).group(1))
    return {"seconds": seconds, "peak_rss_mib": rss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--memory-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rnnserve-bench-"))
    texts, big = work / "texts.txt", work / "big.txt"
    make_file(texts, args.rows)
    make_file(big, args.memory_rows, seed=1)
    common = ["--model", "sentiment", "--input", str(texts), "--quiet"]
    modes = {"in-process": [], "server": None, "ray": ["--engine", "ray"]}
    if args.skip_ray:
        del modes["ray"]
    results: dict[str, list] = {"ceiling_rows_per_s": [], **{mode: [] for mode in modes}}
    server, target = start_rnnserve()
    try:
        for _ in range(args.repeats):
            results["ceiling_rows_per_s"].append(ceiling(texts))
            for mode, extra in modes.items():
                extra = ["--server", target] if mode == "server" else extra
                run = run_cli([*common, "--output", str(work / f"{mode}.jsonl"), *extra])
                results[mode].append(args.rows / run["seconds"])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    memory = run_cli(["--model", "sentiment", "--input", str(big), "--output", str(work / "big.jsonl"), "--quiet"])
    small = run_cli(["--model", "sentiment", "--input", str(texts), "--output", str(work / "small.jsonl"), "--quiet"])

    def with_runs(values: list[float]) -> dict:
        return {**summary(values), "runs": values}

    ceiling_median = statistics.median(results["ceiling_rows_per_s"])
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "rows": args.rows, "repeats": args.repeats,
        "ceiling_rows_per_s": with_runs(results["ceiling_rows_per_s"]),
        "cli_rows_per_s": {mode: with_runs(results[mode]) for mode in modes},
        "cli_vs_ceiling": {mode: statistics.median(results[mode]) / ceiling_median for mode in modes},
        "memory_rows": args.memory_rows, "memory_run_rows_per_s": args.memory_rows / memory["seconds"],
        "peak_rss_mib": {
            f"{args.rows} rows": small["peak_rss_mib"], f"{args.memory_rows} rows": memory["peak_rss_mib"],
        },
        "note": "CLI wall time includes process start and model load; the ceiling is a warm loop in one process.",
    }
    write_results(args.output, report)
    print(f"{'mode':<22} {'rows/s (median, min-max)':<28} {'vs ceiling':>10}")
    print(f"{'in-process ceiling':<22} {ceiling_median:>8.0f} ({min(results['ceiling_rows_per_s']):.0f}-"
          f"{max(results['ceiling_rows_per_s']):.0f})")
    for mode in modes:
        values = results[mode]
        print(f"{'score ' + mode:<22} {statistics.median(values):>8.0f} ({min(values):.0f}-{max(values):.0f})"
              f"{'':>8}{report['cli_vs_ceiling'][mode]:>8.2f}x")
    for rows, rss in report["peak_rss_mib"].items():
        print(f"peak RSS, in-process, {rows}: {rss:.0f} MiB")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
