"""The BENCHMARKS.md section of benchmarks/stream_load.py (the compiled stream load generator):
its table, its plot and the facts the goals and the README headline quote."""

from __future__ import annotations

from collections.abc import Callable

TITLE = "## 5. Streaming: concurrent real-time keyword streams, compiled client"


def plot(stream_load: dict, plt) -> object:
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for server, by_mode in stream_load["servers"].items():
        for mode, data in by_mode.items():
            levels = data["levels"]
            axis.plot([level["streams"] for level in levels], [level["p99_ms"] for level in levels], marker="o",
                      linestyle="-" if server == "rnnserve" else ":", label=f"{server}, {mode}")
    axis.axhline(stream_load["p99_limit_ms"], color="grey", linestyle="--", linewidth=1, label="100 ms budget")
    axis.set_yscale("log")
    axis.set_xlabel("concurrent real-time keyword streams (Go load generator)")
    axis.set_ylabel("p99 response latency (ms)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def section(stream_load: dict | None, save_plot: Callable[[dict], str],
            profile_table: Callable[[dict], list[str]] = lambda profile: []) -> tuple[list[str], dict]:
    """The section's lines and {"max_streams": rnnserve's typed result, "transport": the ceiling}."""
    if stream_load is None:
        return [TITLE, "", "Not measured in this run.", ""], {}
    if "unavailable" in stream_load:
        return [TITLE, "", f"Not measured in this run: {stream_load['unavailable']}.", ""], {}
    lines = [TITLE, "", f"benchmarks/loadgen (Go) opens N streams, each playing one of {stream_load['recordings']} "
             f"espeak-ng keyword recordings ({stream_load['seconds_per_stream']:g} s) once in "
             f"{stream_load['chunk_ms']:g} ms PCM16 chunks at real-time pace: typed `Stream` with a response per "
             "chunk, or KServe v2 sequences over `ModelStreamInfer` or over unary `ModelInfer` calls. A level "
             "passes when the p99 response latency is "
             f"<= {stream_load['p99_limit_ms']:g} ms, every stream kept pace and every stream's detections (KServe: "
             "running labels) equal those of its recording streamed alone. The transport-only server (no model, an "
             "empty answer per chunk) runs in the same run with the same client; levels are interleaved. "
             + ("Each stream has its own connection and start." if not stream_load.get("connections") else
                f"The streams share {stream_load['connections']} connections and start in "
                f"{stream_load.get('start_groups') or 'their own'} groups.")
             + (f" Measured {stream_load['measured_at']}, one run per level (no repeats: a level near the limit "
                "can pass in one run and fail in the next)." if stream_load.get("measured_at") else ""), "",
             "Modes: `typed` answers every chunk; `typed-1s` asks for `report_every_ms` 1000 (responses on "
             "detections and once a second); `kserve` answers every request; `kserve-unary` sends each request of a "
             "sequence as a unary `ModelInfer` call once the one before was answered (Triton's sequence-batcher "
             "protocol), which the native front serves in Rust, while the streaming methods go through the grpcio "
             "server behind it. `transport only (native)` is the do-nothing server on pygrpc-native, the ceiling "
             "of that path. `rnnserve per-stream` is the same "
             "server with `--stream-batch-max-rows 1 --stream-instances 0`: every stream's step is its own step.onnx "
             "call, on as many step instances as the model has (two calls at once on 2 cores). Rows per "
             "step call come from the server's `rnnserve_batch_rows` metric over each level.", "",
             "| server | mode | largest passing level | levels (p99 ms; ✗ failed) | rows per step call, by level "
             "| keyword end to detection, p50 (ms) | client CPU at the last level (cores) |",
             "|---|---|---|---|---|---|---|"]
    for server, by_mode in stream_load["servers"].items():
        for mode, data in by_mode.items():
            cells = ", ".join(f"{level['streams']}: {level['p99_ms']:.0f}{'' if level['passed'] else ' ✗'}"
                              for level in data["levels"])
            timed = [level["keyword_latency_ms"]["p50"] for level in data["levels"]
                     if level["passed"] and level.get("keyword_latency_ms")]
            last = data["levels"][-1]
            rows = ", ".join(f"{level['rows_per_step_call']:.1f}" for level in data["levels"]
                             if level.get("rows_per_step_call") is not None) or "–"
            lines.append(f"| {server} | {mode} | **{data['max_streams']}** | {cells} | {rows} | "
                         f"{f'{timed[-1]:.0f}' if timed else '–'} | {last['client_cpu_s'] / last['wall_s']:.2f} |")
    typed = stream_load["servers"].get("rnnserve", {}).get("typed")
    ceiling = stream_load["servers"].get("transport only", {}).get("typed")
    facts = {"max_streams": typed["max_streams"] if typed else None,
             "transport": ceiling["max_streams"] if ceiling else None}
    unary = stream_load["servers"].get("rnnserve", {}).get("kserve-unary")
    unary_ceiling = stream_load["servers"].get("transport only (native)", {}).get("kserve-unary")
    if facts["max_streams"] is not None and facts["transport"]:
        lines += ["", f"rnnserve holds {facts['max_streams']} typed "
                  f"streams, {facts['max_streams'] / facts['transport']:.0%} of the transport-only ceiling "
                  f"({facts['transport']}; a ceiling at the last level tried means more was not tried)."]
    if unary:
        facts["kserve_unary"] = unary["max_streams"]
        lines += ["", f"Over unary sequence calls (`kserve-unary`) rnnserve holds {unary['max_streams']} streams"
                  + (f", {unary['max_streams'] / unary_ceiling['max_streams']:.0%} of the native transport-only "
                     f"ceiling ({unary_ceiling['max_streams']})" if unary_ceiling and unary_ceiling["max_streams"]
                     else "") + "."]
    single = stream_load["servers"].get("rnnserve per-stream", {}).get("typed")
    if typed and single:
        facts["per_stream"] = single["max_streams"]
        ratio = (f"{typed['max_streams'] / single['max_streams']:.1f}x" if single["max_streams"]
                 else "not a ratio: per-stream execution passed no level tried")
        lines += ["", f"Cellular batching holds {typed['max_streams']} typed streams, per-stream execution "
                  f"{single['max_streams']}: {ratio} (goal: 2x)."]
    failures = [(server, mode, level) for server, by_mode in stream_load["servers"].items()
                for mode, data in by_mode.items() for level in data["levels"] if not level["passed"]]
    if failures:
        lines += ["", "Where each failing level failed:", ""]
    for server, mode, level in failures:
        lines.append(f"- {server}, {mode}, {level['streams']} streams: kept pace {level['streams_kept_pace']}/"
                     f"{level['streams']}, detections equal {level['detections_equal']}/{level['streams']}"
                     + (f", behind: {level['behind']}" if level["behind"] else "")
                     + (f", first error: {level['first_error']}" if level["first_error"] else ""))
    if stream_load.get("profile"):
        lines += ["", *profile_table(stream_load["profile"])]
    lines += ["", f"![stream load]({save_plot(stream_load)})", ""]
    return lines, facts
