"""BENCHMARKS.md and its PNG plots from benchmarks/results/*.json, the last step of `make bench`.

    python benchmarks/report.py            # writes BENCHMARKS.md, benchmarks/plots/*.png, README headline

Every number in the report is read from the results of the run that just happened (each script
writes its JSON); nothing here is typed in by hand. A comparison whose results are missing is
reported as missing. The README's headline block (between the `bench:headline` markers) is
rewritten from the same results.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_stream_load  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "benchmarks" / "plots"
REPORT = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"
HEADLINE_START, HEADLINE_END = "<!-- bench:headline -->", "<!-- /bench:headline -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def span(summary: dict, digits: int = 0) -> str:
    """'median (min-max)' of a {median, min, max} summary."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(summary['median'])} ({f.format(summary['min'])}–{f.format(summary['max'])})"


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runtime(runtime: dict) -> str:
    plt = _plt()
    models = list(runtime["models"])
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        engines = runtime["models"][name]["rows_per_s"]
        for engine, per_batch in engines.items():
            batches = [int(b) for b in per_batch]
            medians = [per_batch[str(b)]["median"] for b in batches]
            low = [per_batch[str(b)]["median"] - per_batch[str(b)]["min"] for b in batches]
            high = [per_batch[str(b)]["max"] - per_batch[str(b)]["median"] for b in batches]
            axis.errorbar(batches, medians, yerr=[low, high], marker="o", capsize=3, label=engine)
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_title(name)
        axis.set_xlabel("batch size")
        axis.set_ylabel("rows/s (one thread)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(figure, "runtime.png")


def plot_unary(unary: dict) -> str:
    plt = _plt()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, per_level in unary["summary"].items():
        levels = [int(level) for level in per_level]
        for axis, key in ((left, "throughput_rps"), (right, "p99_ms")):
            values = [per_level[str(level)][key] for level in levels]
            axis.errorbar(levels, [v["median"] for v in values],
                          yerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]],
                          marker="o", capsize=3, label=mode)
    for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("closed-loop clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle("sentiment over KServe v2: dynamic batching on vs off")
    return _save(figure, "unary.png")


def plot_peers(peers: dict) -> str:
    plt = _plt()
    names = list(peers["servers"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, label in ((left, "throughput_rps", "requests/s"), (right, "p99_ms", "p99 latency (ms)")):
        values = [peers["servers"][n][key] for n in names]
        axis.bar(names, [v["median"] for v in values],
                 yerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]],
                 capsize=4, color=["#1f77b4", "#ff7f0e", "#2ca02c"][: len(names)])
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("same ONNX file, same tritonclient load (32 closed-loop clients)")
    return _save(figure, "peers.png")


def plot_servers(servers: dict) -> str:
    plt = _plt()
    best = servers["best"]
    names = list(best)
    rows = [servers["configs"][best[name]]["summary"] for name in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, label in ((left, "throughput_rps", "requests/s"),
                             (right, "server_cpu_ms_per_request", "server CPU ms per request")):
        values = [row[key] for row in rows]
        axis.bar(range(len(names)), [v["median"] for v in values],
                 yerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]], capsize=4)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    left.axhline(servers["ceiling"]["tried"][servers["ceiling"]["best"]]["median"], color="grey", linestyle="--",
                 linewidth=1, label="in-process ceiling (rows/s)")
    left.legend(fontsize=8)
    figure.suptitle(f"best configuration per server, h2load, {servers['load']['in_flight']} requests in flight")
    return _save(figure, "servers.png")


def plot_streams(streams: dict) -> str:
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for mode, data in streams["modes"].items():
        levels = [level["streams"] for level in data["levels"]]
        axis.plot(levels, [level["p99_ms"]["median"] for level in data["levels"]], marker="o", label=mode)
    axis.axhline(100, color="grey", linestyle="--", linewidth=1, label="100 ms budget")
    axis.set_yscale("log")
    axis.set_xlabel("concurrent real-time audio streams")
    axis.set_ylabel("p99 chunk latency (ms)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, "streams.png")


def plot_scoring(scoring: dict) -> str:
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    names = ["in-process ceiling", *(f"score {m}" for m in scoring["cli_rows_per_s"])]
    values = [scoring["ceiling_rows_per_s"], *scoring["cli_rows_per_s"].values()]
    axis.bar(names, [v["median"] for v in values],
             yerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]], capsize=4)
    axis.set_ylabel("rows/s")
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(f"sentiment, {scoring['rows']:,} rows")
    return _save(figure, "scoring.png")


def _save(figure, name: str) -> str:
    PLOTS.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(PLOTS / name, dpi=110)
    _plt().close(figure)
    return f"benchmarks/plots/{name}"


def profile_table(profile: dict | None) -> list[str]:
    if not profile:
        return ["(no profile: py-spy was not available in this run)"]
    lines = [f"Server profile (py-spy, {profile['samples']:,} samples of busy threads over {profile['seconds']:g} s"
             f" at {profile['streams'] if 'streams' in profile else profile.get('clients', '?')} "
             f"{'streams' if 'streams' in profile else 'clients'}), share of samples:", "",
             "| where | share |", "|---|---|"]
    lines += [f"| {name} | {share:.0%} |" for name, share in profile["shares"].items()]
    return lines


def section_runtime(runtime: dict | None) -> tuple[list[str], dict]:
    if runtime is None:
        return ["## 1. Runtime", "", "Not measured in this run (benchmarks/results/runtime.json missing).", ""], {}
    lines = ["## 1. Runtime: PyTorch eager vs ONNX Runtime fp32 vs INT8", "",
             f"One thread per runtime; rows/s, median of {runtime.get('repeats', 3)} repeats (min–max). "
             f"torch {runtime['machine']['torch']}, onnxruntime {runtime['machine']['onnxruntime']}. "
             "PyTorch runs the training code's model with the bundled weights read back from model.onnx; "
             "parity is checked before timing.", ""]
    head = None
    for name, model in runtime["models"].items():
        engines = model["rows_per_s"]
        batches = list(next(iter(engines.values())))
        if head is None:
            head = batches
        lines += [f"**{name}** (PyTorch vs ONNX max |Δlogit| {model['pytorch_vs_onnx_max_abs_diff']:.1e})", "",
                  "| engine | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for engine, per in engines.items():
            lines.append(f"| {engine} | " + " | ".join(span(per[b]) for b in batches) + " |")
        eager, fp32 = engines["pytorch eager"], engines["onnxruntime fp32"]
        ratios = ", ".join(f"{fp32[b]['median'] / eager[b]['median']:.2f}x at {b}" for b in batches)
        lines += ["", f"ONNX Runtime fp32 vs PyTorch eager: {ratios}.", ""]
    lines += [f"![runtime]({plot_runtime(runtime)})", ""]
    return lines, {}


def section_unary(unary: dict | None) -> list[str]:
    if unary is None:
        return ["## 2. Server unary", "", "Not measured in this run.", ""]
    summary = unary["summary"]
    levels = list(next(iter(summary.values())))
    lines = ["## 2. Server unary: throughput and latency against concurrency", "",
             f"`{unary['model']}` over the KServe v2 API, one text per request, closed-loop tritonclient threads; "
             f"{unary['seconds']:g} s windows after warm-up, median of {unary['repeats']} repeats (min–max). "
             + "; ".join(f"{mode}: `{' '.join(flags)}`" for mode, flags in unary["modes"].items()) + ".", "",
             "| clients | " + " | ".join(f"{mode} req/s | {mode} p50 ms | {mode} p99 ms" for mode in summary) + " |",
             "|---|" + "---|" * (3 * len(summary))]
    for level in levels:
        cells = []
        for mode in summary:
            row = summary[mode][level]
            cells += [span(row["throughput_rps"]), span(row["p50_ms"], 1), span(row["p99_ms"], 1)]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    best = {mode: max(summary[mode].values(), key=lambda r: r["throughput_rps"]["median"]) for mode in summary}
    lines += ["", "Peak throughput: " + ", ".join(
        f"{mode} {best[mode]['throughput_rps']['median']:,.0f} req/s" for mode in summary) + ".", "",
        f"![unary]({plot_unary(unary)})", ""]
    return lines


SERVER_COLUMNS = "req/s | p50 ms | p99 ms | server CPU (cores) | CPU ms per request"


def server_cells(measured: dict) -> str:
    """The SERVER_COLUMNS cells of one configuration's summary."""
    return (f"{span(measured['throughput_rps'])} | {span(measured['p50_ms'], 1)} | {span(measured['p99_ms'], 1)} | "
            f"{span(measured['server_cpu_cores'], 2)} | {span(measured['server_cpu_ms_per_request'], 2)}")


def config_flags(config: dict) -> str:
    """What was set for one configuration, as the report shows it."""
    if config["server"] == "pytriton":
        return f"instances {config['instances']}, threads {config['intra_op_threads'] or 'default'}"
    if config["server"] == "mlserver":
        return f"parallel_workers {config['parallel_workers']}, threads {config['intra_op_threads'] or 'default'}"
    return " ".join(config["flags"]) or "(none)"


def failed_rows(failures: dict, columns: int) -> list[str]:
    return [f"| {label} | not measured: {reason.splitlines()[0][:200]} |" + " |" * (columns - 2)
            for label, reason in failures.items()]


def section_servers(servers: dict | None) -> tuple[list[str], dict]:
    """The server-side view: h2load against every server, best configuration and all tried."""
    title = "## 3. Servers measured at the server: h2load against rnnserve, PyTriton, MLServer and a bare gRPC server"
    if servers is None or servers.get("unavailable"):
        why = servers["unavailable"] if servers else "benchmarks/results/servers.json missing"
        return [title, "", f"Not measured in this run: {why}.", ""], {}
    load_, configs, best = servers["load"], servers["configs"], servers["best"]
    top = servers["ceiling"]["tried"][servers["ceiling"]["best"]]["median"]
    fronts = (f"rnnserve's gRPC fronts side by side: {', '.join(servers['fronts'])}." if servers["front_flag"]
              else "This rnnserve has no `--grpc-front`: its one front (grpcio) is measured.")
    lines = [title, ""] + (["**A smoke run (`--quick`): windows too short to quote.**", ""] if load_["quick"] else [])
    if servers.get("measured_at"):
        lines += [f"Measured {servers['measured_at']} (this section's own run: its numbers compare with each "
                  "other, not with sections measured at another time).", ""]
    lines += [
        f"Model: {servers['model']}. Load: {servers['machine'].get('h2load', 'h2load')} with {load_['in_flight']} "
        f"requests in flight ({load_['connections']} HTTP/2 connections x {load_['streams_per_connection']} streams), "
        "every request the same prebuilt gRPC ModelInfer body (KServe v2, one row of `ids` in raw_input_contents); "
        f"{load_['warmup_s']:g} s warm-up then {load_['seconds']:g} s measured, {load_['repeats']} repeat(s) "
        "interleaved (median, min–max). Each server answered the body with grpc-status 0 (curl) before and after "
        "its window, and every measured request got a response body. Latencies are h2load's per-request log; "
        "server CPU is the server process tree's user+system time over the window. The in-process ceiling is the "
        f"model alone in ONNX Runtime, best of sessions x threads x batch: {top:,.0f} rows/s "
        f"({servers['ceiling']['best']}). {fronts} Alone: `bash benchmarks/setup_peers.sh && "
        "python benchmarks/servers.py` (benchmarks/README.md).", ""]
    pytriton = configs[best["PyTriton"]]["summary"] if "PyTriton" in best else None
    lines += ["**Best configuration per server**", "",
              f"| server | best configuration | {SERVER_COLUMNS} | of the ceiling | req/s vs best PyTriton "
              "| CPU per request vs best PyTriton |", "|" + "---|" * 10]
    for group, label in best.items():
        row = configs[label]["summary"]
        versus = (f"{row['throughput_rps']['median'] / pytriton['throughput_rps']['median']:.2f}x | "
                  f"{row['server_cpu_ms_per_request']['median'] / pytriton['server_cpu_ms_per_request']['median']:.2f}x"
                  if pytriton else "— | —")
        # The floor runs no model: a fraction of the model's ceiling says nothing of it.
        of_ceiling = ("—" if configs[label]["config"]["server"] == "floor"
                      else f"{row['throughput_rps']['median'] / top:.2f}")
        lines.append(f"| {group} | {label.split(': ', 1)[-1]} | {server_cells(row)} | {of_ceiling} | {versus} |")
    lines += ["", "**Every configuration tried**", "",
              f"| configuration | settings | {SERVER_COLUMNS} | h2load CPU (cores) | errors |", "|" + "---|" * 9]
    lines += [f"| {label} | `{config_flags(row['config'])}` | {server_cells(row['summary'])} | "
              f"{span(row['summary']['client_cpu_cores'], 2)} | {row['errors']} |" for label, row in configs.items()]
    lines += failed_rows(servers["failures"], 9)
    lines += ["", "In-process ceiling, rows/s: " + "; ".join(
        f"{label} {span(value)}" for label, value in servers["ceiling"]["tried"].items()) + ".", ""]
    text = servers.get("text")
    if text:
        text_top = text["ceiling"]["tried"][text["ceiling"]["best"]]["median"]
        lines += [f"**`{text['model']}` over the KServe v2 text path** (`text` BYTES [1], the one text "
                  f"\"{text['text']}\" in every request), with each front's best settings above. Its in-process "
                  f"ceiling is the data plane's classify, tokenisation included: {text_top:,.0f} rows/s "
                  f"({text['ceiling']['best']}).", "",
                  f"| configuration | {SERVER_COLUMNS} | of its ceiling |", "|" + "---|" * 7]
        lines += [f"| {label} | {server_cells(row['summary'])} | "
                  f"{row['summary']['throughput_rps']['median'] / text_top:.2f} |"
                  for label, row in text["configs"].items()]
        lines += failed_rows(text["failures"], 7) + [""]
    lines += [f"![servers]({plot_servers(servers)})", ""]
    ours = [configs[label]["summary"] for group, label in best.items() if group.startswith("rnnserve")]
    if not ours or not pytriton:
        return lines, {}
    mine = max(ours, key=lambda row: row["throughput_rps"]["median"])
    facts = {"pytriton": (mine["throughput_rps"]["median"] / pytriton["throughput_rps"]["median"],
                          mine["p99_ms"]["median"] <= pytriton["p99_ms"]["median"]),
             "of_ceiling": mine["throughput_rps"]["median"] / top}
    grpcio = [configs[label]["summary"] for group, label in best.items() if group == "rnnserve, grpcio front"]
    if grpcio:
        facts["grpcio_pytriton"] = grpcio[0]["throughput_rps"]["median"] / pytriton["throughput_rps"]["median"]
    return lines, facts


def section_peers(peers: dict | None) -> tuple[list[str], dict]:
    if peers is None:
        return ["## 4. Peers, the Python-client view", "",
                "Not measured in this run (benchmarks/results/peers.json missing).", ""], {}
    load_ = peers["load"]
    lines = ["## 4. Peers, the Python-client view: rnnserve vs Triton (PyTriton) vs MLServer through tritonclient",
             "",
             f"Model: {peers['model']}. Load: {load_['threads']} closed-loop tritonclient threads, "
             f"{load_['rows_per_request']} row per request, {load_['warmup_s']:g} s warm-up then "
             f"{load_['seconds']:g} s, {load_['repeats']} repeats (median, min–max). "
             "Every server batches up to 32 rows waiting at most 5 ms and runs ONNX Runtime on the CPU; "
             "server CPU is the server process tree's CPU time over the window.",
             "", "| server | req/s | p50 ms | p99 ms | server CPU (cores) | req per CPU-second | errors |",
             "|---|---|---|---|---|---|---|"]
    for name, row in peers["servers"].items():
        efficiency = row["throughput_rps"]["median"] / row["server_cpu_cores"]["median"]
        lines.append(f"| {name} | {span(row['throughput_rps'])} | {span(row['p50_ms'], 1)} | {span(row['p99_ms'], 1)}"
                     f" | {span(row['server_cpu_cores'], 2)} | {efficiency:,.0f} | {row['errors']} |")
    for name, reason in peers.get("failures", {}).items():
        lines.append(f"| {name} | not measured: {reason.splitlines()[0][:160]} | | | | | |")
    facts = {}
    servers = peers["servers"]
    if "rnnserve" in servers and "pytriton" in servers:
        ratio = servers["rnnserve"]["throughput_rps"]["median"] / servers["pytriton"]["throughput_rps"]["median"]
        p99_ok = servers["rnnserve"]["p99_ms"]["median"] <= servers["pytriton"]["p99_ms"]["median"]
        facts["pytriton"] = (ratio, p99_ok)
        lines += ["", f"rnnserve / PyTriton throughput: **{ratio:.2f}x**, p99 "
                  f"{'no worse' if p99_ok else 'worse'} ({servers['rnnserve']['p99_ms']['median']:.0f} vs "
                  f"{servers['pytriton']['p99_ms']['median']:.0f} ms)."]
    if "rnnserve" in servers and "mlserver" in servers:
        ratio = servers["rnnserve"]["throughput_rps"]["median"] / servers["mlserver"]["throughput_rps"]["median"]
        facts["mlserver"] = ratio
        lines += [f"rnnserve / MLServer throughput: **{ratio:.2f}x**."]
    alone = peers.get("model_alone")
    if alone:
        lines += [f"The model alone in ONNX Runtime (batch 32, a warm loop, nothing else running): "
                  f"{alone['rows_per_s']:,.0f} rows/s with the default threads; "
                  f"{alone['cpu_ms_per_row_one_thread']:.2f} ms of CPU per row on one thread."]
    lines += ["", f"![peers]({plot_peers(peers)})", ""]
    return lines, facts


def section_streams(streams: dict | None) -> tuple[list[str], dict]:
    if streams is None:
        return ["## 5b. Streaming with the Python client", "", "Not measured in this run.", ""], {}
    lines = ["## 5b. Streaming with the Python client: concurrent real-time audio streams on `keywords`", "",
             f"Each stream sends {streams['chunk_ms']:g} ms PCM16 chunks at real-time pace and gets a response per "
             f"chunk; a level passes when the median over {streams['repeats']} repeats of the p99 chunk latency is "
             f"<= 100 ms and the client keeps pace ({streams['seconds_per_level']:g} s per window). Levels are tried "
             "in order until one fails. The client is one asyncio process on the same machine.", "",
             "| mode | largest passing level | levels (p99 ms, median of repeats) |", "|---|---|---|"]
    for mode, data in streams["modes"].items():
        cells = ", ".join(f"{level['streams']}: {level['p99_ms']['median']:.0f}{'' if level['passed'] else ' ✗'}"
                          for level in data["levels"])
        lines.append(f"| {mode} | **{data['max_streams']}** | {cells} |")
    modes = streams["modes"]
    cellular = modes["cellular batching"]["max_streams"]
    single = modes["per-stream execution"]["max_streams"]
    ratio = cellular / single if single else None
    lines += ["", f"Cellular batching vs per-stream execution: {ratio:.2f}x the streams." if ratio else ""]
    if "transport only" in modes:
        lines += [f"The transport-only row is the same client against a gRPC server that answers each chunk with an "
                  f"empty response and does no work: the ceiling of one Python gRPC process on this machine "
                  f"({modes['transport only']['max_streams']} streams)."]
    lines += ["", f"![streams]({plot_streams(streams)})", ""]
    return lines, {"cellular": cellular, "single": single, "ratio": ratio,
                   "transport": modes.get("transport only", {}).get("max_streams")}


def section_scoring(scoring: dict | None) -> tuple[list[str], dict]:
    if scoring is None:
        return ["## 6. Batch scoring", "", "Not measured in this run.", ""], {}
    lines = ["## 6. Batch scoring: `rnnserve score` against the in-process ceiling", "",
             f"{scoring['rows']:,} generated texts, sentiment, median of {scoring['repeats']} repeats (min–max). "
             "The ceiling is the data plane's own classify on batches of 256 already in memory; each CLI run is its "
             "own process timed from launch to exit (process start and model load included).", "",
             "| run | rows/s | vs ceiling |", "|---|---|---|",
             f"| in-process ceiling | {span(scoring['ceiling_rows_per_s'])} | 1.00x |"]
    for mode, row in scoring["cli_rows_per_s"].items():
        lines.append(f"| `rnnserve score` {mode} | {span(row)} | {scoring['cli_vs_ceiling'][mode]:.2f}x |")
    if scoring.get("memory_run_rows_per_s"):
        lines.append(f"| `rnnserve score` in-process, {scoring['memory_rows']:,} rows (1 run) | "
                     f"{scoring['memory_run_rows_per_s']:,.0f} | "
                     f"{scoring['memory_run_rows_per_s'] / scoring['ceiling_rows_per_s']['median']:.2f}x |")
    lines += ["", "Peak RSS of the in-process CLI: " + ", ".join(
        f"{rows}: {rss:.0f} MiB" for rows, rss in scoring["peak_rss_mib"].items()) + ".", "",
        f"![scoring]({plot_scoring(scoring)})", ""]
    facts = {"in-process": scoring["cli_vs_ceiling"]["in-process"], "rows": scoring["rows"]}
    if scoring.get("memory_run_rows_per_s"):
        facts["long"] = (scoring["memory_rows"],
                         scoring["memory_run_rows_per_s"] / scoring["ceiling_rows_per_s"]["median"])
    return lines, facts


def section_footprint(footprint: dict | None) -> tuple[list[str], dict]:
    if footprint is None:
        return ["## 7. Footprint", "", "Not measured in this run.", ""], {}
    image = footprint.get("image_mb")
    lines = ["## 7. Footprint", "", f"`rnnserve serve` with the bundled models ({', '.join(footprint['models'])}).", "",
             "| measure | value |", "|---|---|",
             f"| process start to health SERVING (s, median (min–max) of {footprint.get('repeats', 5)}) | "
             f"{span(footprint['start_to_ready_s'], 2)} |",
             f"| RSS when ready (MiB) | {footprint['rss_ready_mib']:.0f} |",
             f"| RSS after typed, audio and stream requests (MiB) | {footprint['rss_after_requests_mib']:.0f} |",
             f"| CPU image size (MB) | {f'{image:.0f}' if image else 'not built in this run (make container-test)'} |",
             ""]
    return lines, {"ready": footprint["start_to_ready_s"]["median"],
                   "rss": max(footprint["rss_ready_mib"], footprint["rss_after_requests_mib"]), "image": image}


def server_gap(servers: dict | None) -> list[str]:
    """Where a server's CPU per request goes, from the h2load run: the floor, the model, the rest."""
    if not servers or servers.get("unavailable") or not servers["best"]:
        return []
    rows = {group: servers["configs"][label]["summary"] for group, label in servers["best"].items()}
    cost = {group: row["server_cpu_ms_per_request"]["median"] for group, row in rows.items()}
    cores = servers["machine"]["cpus"]
    ceiling = servers["ceiling"]["tried"][servers["ceiling"]["best"]]["median"]
    text = (f"**At the server.** With h2load as the client (at most "
            f"{max(row['client_cpu_cores']['median'] for row in rows.values()):.2f} cores in any window), the CPU "
            "each request costs the server, best configuration of each: "
            + ", ".join(f"{group} {ms:.2f} ms" for group, ms in cost.items()) + ". "
            f"The model alone needs at most {cores * 1000 / ceiling:.2f} ms of CPU per row ({cores} cores at its "
            f"ceiling of {ceiling:,.0f} rows/s).")
    if "transport floor" in cost:
        text += (f" A bare grpc.aio server answering fixed bytes spends {cost['transport floor']:.2f} ms per call: "
                 "that much of any Python gRPC server's cost is the transport itself.")
    return [text, ""]


def gaps(servers: dict | None, peers: dict | None, streams: dict | None, scoring: dict | None) -> list[str]:
    """Why a goal is missed, in this run's own numbers."""
    lines = ["## Where the gaps come from", ""] + server_gap(servers)
    if peers and {"rnnserve", "pytriton"} <= set(peers["servers"]):
        ours, theirs = peers["servers"]["rnnserve"], peers["servers"]["pytriton"]
        target = 2 * theirs["throughput_rps"]["median"]
        alone = peers.get("model_alone")
        cpus = peers["machine"]["cpus"]
        text = (f"**2x PyTriton.** 2x PyTriton would be {target:,.0f} req/s. Under this load rnnserve's process used "
                f"{ours['server_cpu_cores']['median']:.2f} of the machine's {cpus} cores and PyTriton's "
                f"{theirs['server_cpu_cores']['median']:.2f}; the 32 tritonclient threads need the rest.")
        client = ours.get("client_cpu_cores")
        if alone and client:
            client_ms = client["median"] / ours["throughput_rps"]["median"] * 1000
            model_ms = alone["cpu_ms_per_row_one_thread"]
            ceiling = cpus * 1000 / (client_ms + model_ms)
            text += (f" Each request costs the load generator {client_ms:.2f} ms of CPU (measured in this run) and "
                     f"the model itself at least {model_ms:.2f} ms (batch 32, one thread, alone): with nothing else "
                     f"at all, {cpus} cores could carry at most {ceiling:,.0f} req/s of this load, "
                     f"{ceiling / theirs['throughput_rps']['median']:.2f}x PyTriton, before any gRPC, request "
                     "checking or batching work in the server.")
            budget = cpus * 1000 / target - client_ms - model_ms
            spent = ours["server_cpu_cores"]["median"] / ours["throughput_rps"]["median"] * 1000 - model_ms
            text += (f" At 2x PyTriton that leaves {budget:.2f} ms of CPU per request for everything else the server "
                     f"does (gRPC, protobuf, checks, batching, responses); rnnserve spends {spent:.2f} ms on it now.")
            trivial = peers.get("rnnserve_trivial_model")
            if trivial:
                text += (f" Served with no model behind the same tensors (logits = the first ids), rnnserve still "
                         f"spends {trivial['server_cpu_ms_per_request']:.2f} ms of CPU per request and peaks at "
                         f"{trivial['throughput_rps']:,.0f} req/s: that cost is the Python gRPC stack and the "
                         "request handling around it (the profile below), not the model.")
        per_cpu = [row["throughput_rps"]["median"] / row["server_cpu_cores"]["median"] for row in (ours, theirs)]
        text += (f" Per unit of server CPU rnnserve does {per_cpu[0]:,.0f} requests per CPU-second against "
                 f"PyTriton's {per_cpu[1]:,.0f}.")
        lines += [text, ""]
        if peers.get("profile"):
            lines += profile_table(peers["profile"]) + [""]
    if streams:
        modes = streams["modes"]
        cellular = modes["cellular batching"]["max_streams"]
        transport = modes.get("transport only", {}).get("max_streams")
        text = f"**500 real-time streams, Python client.** rnnserve held {cellular} here."
        if transport is not None and transport > cellular:
            text += (f" A gRPC server that does no work at all (an empty response per chunk) held {transport} with "
                     "the same client on the same cores, so the transport is not what stops rnnserve: its per-chunk "
                     "work is (decoding the message, the audio front end, queueing the step, the detector, building "
                     "the response), all Python under one interpreter lock, next to the client on the same cores "
                     "(profile below).")
        elif transport is not None:
            text += (f" A gRPC server that does no work at all held {transport}: with the client on the same cores, "
                     "the per-message cost of Python gRPC itself is the limit here.")
        lines += [text]
        if streams.get("profile"):
            shares = streams["profile"]["shares"]
            ort = next((v for k, v in shares.items() if "ONNX Runtime" in k), None)
            lines += ["", "**Cellular batching vs per-stream execution.** Batching merges the ONNX Runtime step calls"
                      + (f", which are {ort:.0%} of the busy samples at {streams['profile']['streams']} streams; "
                         "the rest is per-chunk work (messages, audio front end, detector) that batching does not "
                         "remove, so the ratio is bounded by it." if ort is not None else ".")]
            lines += [""] + profile_table(streams["profile"])
        lines += [""]
    if scoring and scoring.get("memory_run_rows_per_s"):
        ceiling = scoring["ceiling_rows_per_s"]["median"]
        lines += [f"**CLI vs in-process.** On {scoring['rows']:,} rows the CLI ran at "
                  f"{scoring['cli_vs_ceiling']['in-process']:.2f}x the ceiling including process start and model "
                  f"load; on {scoring['memory_rows']:,} rows, where those costs are spread thin, at "
                  f"{scoring['memory_run_rows_per_s'] / ceiling:.2f}x. What remains is reading, id and JSON writing "
                  "on the same thread as the ONNX Runtime calls.", ""]
    return lines


def main() -> int:
    runtime, unary, servers, peers, streams, stream_load, scoring, footprint = (
        load(name) for name in ("runtime", "unary", "servers", "peers", "streams", "stream_load", "scoring",
                                "footprint"))
    started = RESULTS / "started_at"
    # `rnnserve bench` writes both ends of the run, so a report rebuilt later says the same.
    ended = RESULTS / "finished_at"
    finished = int(ended.read_text()) if ended.exists() else time.time()
    elapsed = finished - int(started.read_text()) if started.exists() and ended.exists() else None
    body: list[str] = []
    part, _ = section_runtime(runtime)
    body += part
    body += section_unary(unary)
    part, server_facts = section_servers(servers)
    body += part
    part, peer_facts = section_peers(peers)
    body += part
    part, load_facts = report_stream_load.section(
        stream_load, lambda results: _save(report_stream_load.plot(results, _plt()), "stream_load.png"), profile_table)
    body += part
    part, stream_facts = section_streams(streams)
    body += part
    part, scoring_facts = section_scoring(scoring)
    body += part
    part, footprint_facts = section_footprint(footprint)
    body += part

    goals = ["## Goals", "", "| goal | measured | |", "|---|---|---|"]
    for view, facts in (("at the server, h2load, best configurations", server_facts),
                        ("Python-client view, tritonclient", peer_facts)):
        if "pytriton" in facts:
            ratio, p99_ok = facts["pytriton"]
            goals.append(f"| >= 2x PyTriton's throughput, p99 no worse ({view}) | {ratio:.2f}x, p99 "
                         f"{'no worse' if p99_ok else 'worse'} | {verdict(ratio >= 2 and p99_ok)} |")
    if "of_ceiling" in server_facts:
        share = server_facts["of_ceiling"]
        goals.append(f"| >= 0.6x the in-process ceiling (at the server, best front) | {share:.2f}x | "
                     f"{verdict(share >= 0.6)} |")
    if "grpcio_pytriton" in server_facts:
        ratio = server_facts["grpcio_pytriton"]
        goals.append(f"| >= 1.6x PyTriton with the grpcio front (at the server) | {ratio:.2f}x | "
                     f"{verdict(ratio >= 1.6)} |")
    if load_facts.get("max_streams") is not None:
        goals.append(f"| >= 500 concurrent real-time keyword streams (compiled client) | {load_facts['max_streams']} "
                     f"| {verdict(load_facts['max_streams'] >= 500)} |")
        if load_facts.get("kserve_unary") is not None:
            goals.append(f"| >= 500 concurrent real-time keyword streams, KServe sequences over unary calls (compiled "
                         f"client) | {load_facts['kserve_unary']} | {verdict(load_facts['kserve_unary'] >= 500)} |")
        if load_facts.get("per_stream") is not None:
            single = load_facts["per_stream"]
            goals.append(f"| cellular batching >= 2x the streams of per-stream execution (compiled client) | "
                         f"{load_facts['max_streams']} vs {single} | "
                         + (verdict(load_facts["max_streams"] >= 2 * single) if single
                            else "not measured (per-stream passed no level)") + " |")
    if stream_facts:
        goals.append(f"| >= 500 concurrent real-time streams (Python client) | {stream_facts['cellular']} | "
                     f"{verdict(stream_facts['cellular'] >= 500)} |")
        if stream_facts["ratio"]:
            goals.append(f"| cellular batching >= 3x per-stream execution | {stream_facts['ratio']:.2f}x | "
                         f"{verdict(stream_facts['ratio'] >= 3)} |")
    if scoring_facts:
        long_run = scoring_facts.get("long")
        measured = f"{scoring_facts['in-process']:.2f}x on {scoring_facts['rows']:,} rows (process start included)"
        if long_run:
            measured += f"; {long_run[1]:.2f}x on {long_run[0]:,} rows (1 run)"
        met = scoring_facts["in-process"] >= 0.9
        goals.append(f"| CLI >= 0.9x the in-process pipeline | {measured} | "
                     + ("met" if met else f"met on {long_run[0]:,} rows only" if long_run and long_run[1] >= 0.9
                        else "**not met**") + " |")
    if footprint_facts:
        goals.append(f"| start to ready <= 3 s | {footprint_facts['ready']:.2f} s | "
                     f"{verdict(footprint_facts['ready'] <= 3)} |")
        goals.append(f"| RSS <= 300 MB | {footprint_facts['rss'] * 1.048576:.0f} MB | "
                     f"{verdict(footprint_facts['rss'] * 1.048576 <= 300)} |")
    machine = (runtime or unary or servers or {}).get("machine", {})
    head = [
        "# Benchmarks", "",
        "Generated by `make bench` (benchmarks/report.py) from benchmarks/results/*.json; every number below comes "
        "from that one run, except a section that says when it was measured (one script rerun alone). Do not edit by "
        "hand: rerun `make bench`.", "",
        f"- Machine: {cpu_model()}, {machine.get('cpus', '?')} CPUs, {machine.get('platform', platform.platform())}, "
        f"Python {platform.python_version()}. Client and server share these cores.",
        f"- Run finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(finished))}"
        + (f"; `make bench` took {elapsed / 60:.1f} min end to end (peer set-up included)." if elapsed else "."),
        "- Reproduce: `make bench` (creates the peers' virtual environments with benchmarks/setup_peers.sh, builds "
        "the CPU image when podman is there and it is missing, runs every script, then this report). Each script "
        "also runs alone; see benchmarks/README.md.", "",
    ]
    text = "\n".join(head + goals + [""] + gaps(servers, peers, streams, scoring) + body)
    REPORT.write_text(text.rstrip() + "\n")
    write_headline(server_facts, peer_facts, stream_facts, load_facts, scoring_facts, footprint_facts, runtime)
    print(f"wrote {REPORT.relative_to(ROOT)} and {len(list(PLOTS.glob('*.png')))} plots")
    return 0


def write_headline(server_facts: dict, peer_facts: dict, stream_facts: dict, load_facts: dict, scoring_facts: dict,
                   footprint_facts: dict, runtime: dict | None) -> None:
    if not README.exists():
        return
    text = README.read_text()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        return
    items = []
    if "pytriton" in server_facts:
        items.append(f"**{server_facts['pytriton'][0]:.2f}x** PyTriton's throughput measured at the server (h2load, "
                     "best configuration of each)")
    if "pytriton" in peer_facts:
        ratio, _ = peer_facts["pytriton"]
        line = f"**{ratio:.2f}x** PyTriton's throughput"
        if "mlserver" in peer_facts:
            line += f" and **{peer_facts['mlserver']:.2f}x** MLServer's"
        items.append(line + " on the same ONNX file and load through tritonclient")
    if runtime:
        sentiment = runtime["models"].get("sentiment", {}).get("rows_per_s")
        if sentiment:
            ratio = sentiment["onnxruntime fp32"]["32"]["median"] / sentiment["pytorch eager"]["32"]["median"]
            items.append(f"ONNX Runtime **{ratio:.2f}x** PyTorch eager (sentiment, batch 32, one thread)")
    if load_facts.get("max_streams") is not None:
        items.append(f"**{load_facts['max_streams']}** concurrent real-time keyword streams (compiled client)")
    elif stream_facts:
        items.append(f"**{stream_facts['cellular']}** concurrent real-time audio streams "
                     f"({stream_facts['ratio']:.2f}x per-stream execution)" if stream_facts["ratio"] else
                     f"**{stream_facts['cellular']}** concurrent real-time audio streams")
    if scoring_facts:
        items.append(f"`rnnserve score` at **{scoring_facts['in-process']:.2f}x** the in-process ceiling")
    if footprint_facts:
        items.append(f"ready in **{footprint_facts['ready']:.1f} s**, "
                     f"**{footprint_facts['rss'] * 1.048576:.0f} MB** RSS")
    cpus = ((runtime or {}).get("machine") or {}).get("cpus", "?")
    block = (f"{HEADLINE_START}\nMeasured by `make bench` on {cpu_model()} ({cpus}"
             " CPUs, client on the same cores): " + "; ".join(items) + ". Tables, plots, gaps and how to reproduce: "
             f"[BENCHMARKS.md](BENCHMARKS.md).\n{HEADLINE_END}")
    before, rest = text.split(HEADLINE_START, 1)
    after = rest.split(HEADLINE_END, 1)[1]
    README.write_text(before + block + after)


if __name__ == "__main__":
    raise SystemExit(main())
