"""Load measured at the server: h2load (Debian's nghttp2-client) sending one prebuilt gRPC
ModelInfer body over HTTP/2 with a fixed number of requests in flight.

A gRPC request on the wire is a 5-byte prefix (compression flag 0, then the message length as
4 bytes big-endian) and the serialised message; h2load posts that file as it is, with
`content-type: application/grpc` and `te: trailers`, to the KServe v2 ModelInfer path. h2load
is C and costs the shared cores little, so the numbers are the server's, not a Python client's.
h2load only sees HTTP statuses: probe() sends the same bytes with curl first and fails unless
the answer's grpc-status is 0, and run() checks that the responses carried bodies.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PATH = "/inference.GRPCInferenceService/ModelInfer"
HEADERS = ("content-type: application/grpc", "te: trailers")


class ProbeFailed(RuntimeError):
    """The server did not answer the prebuilt body with grpc-status 0."""


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: no compression, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_unframe(data: bytes) -> bytes:
    """The message inside one uncompressed gRPC frame (ValueError when it is not exactly one)."""
    if len(data) < 5 or data[0] != 0 or struct.unpack(">I", data[1:5])[0] != len(data) - 5:
        raise ValueError(f"not one uncompressed gRPC message ({len(data)} bytes)")
    return data[5:]


def infer_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
    """A serialised KServe v2 ModelInferRequest of one input in raw_input_contents, as
    tritonclient sends it; no outputs named, so the server returns them all."""
    from serving.grpc.generated.inference import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[raw])
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request.SerializeToString()


def ids_body(model: str, ids: np.ndarray) -> bytes:
    """The framed ModelInfer body of an INT64 tensor `ids`."""
    return grpc_frame(infer_request(model, "ids", "INT64", list(ids.shape), ids.astype("<i8").tobytes()))


def text_body(model: str, text: str) -> bytes:
    """The framed ModelInfer body of a text model's `text` BYTES [1] (UTF-8 in KServe's raw BYTES form)."""
    from serving.tensors import encode_bytes

    return grpc_frame(infer_request(model, "text", "BYTES", [1], encode_bytes([text.encode()])))


def logits_response(model: str, logits: np.ndarray) -> bytes:
    """A serialised ModelInferResponse carrying FP32 `logits`, what a tensor model answers."""
    from serving.grpc.generated.inference import inference_pb2 as pb

    response = pb.ModelInferResponse(model_name=model, model_version="1",
                                     raw_output_contents=[logits.astype("<f4").tobytes()])
    response.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
    return response.SerializeToString()


def missing_tools() -> list[str]:
    return [tool for tool in ("h2load", "curl") if shutil.which(tool) is None]


def probe(target: str, body: Path, timeout_s: float = 30) -> bytes:
    """POST the body once with curl (HTTP/2 without TLS) and return the response message (the
    serialised ModelInferResponse); raises ProbeFailed unless the trailers say grpc-status 0."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as out:
        done = subprocess.run(
            ["curl", "-sS", "-v", "--http2-prior-knowledge", "--max-time", str(timeout_s), "--data-binary",
             f"@{body}", *(part for header in HEADERS for part in ("-H", header)), "-o", out.name,
             f"http://{target}{PATH}"], capture_output=True, text=True)
        data = Path(out.name).read_bytes()
    status = re.search(r"^< grpc-status: (\d+)", done.stderr, re.MULTILINE)
    if done.returncode != 0 or status is None or status.group(1) != "0":
        message = re.search(r"^< grpc-message: (.*)$", done.stderr, re.MULTILINE)
        raise ProbeFailed(f"{target}{PATH}: grpc-status {status.group(1) if status else 'missing'}"
                          f"{': ' + message.group(1).strip() if message else ''} (curl exit {done.returncode}; "
                          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'})")
    return grpc_unframe(data)


def run(target: str, body: Path, response_bytes: int, in_flight: int, connections: int, warmup_s: float,
        seconds: float, on_window_start: Callable[[], None] | None = None,
        on_window_end: Callable[[], None] | None = None) -> dict:
    """h2load over `connections` HTTP/2 connections with in_flight / connections streams each
    (`in_flight` requests always outstanding), warmup_s unmeasured then `seconds` measured.
    on_window_start() runs when the measured window begins, on_window_end() as soon as h2load
    exits. Latencies come from h2load's
    --log-file, which holds the measured window's requests only. response_bytes is the size of
    the probe's answer: fewer response bodies than measured requests raises ProbeFailed (an
    answer with a non-zero grpc-status has no body, and h2load counts it as a success)."""
    if in_flight % connections:
        raise ValueError(f"in_flight {in_flight} is not a multiple of connections {connections}")
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "requests.tsv"
        command = ["h2load", "-c", str(connections), "-m", str(in_flight // connections), "-t", "1",
                   # h2load takes whole numbers with a unit: milliseconds
                   "--warm-up-time", f"{round(warmup_s * 1000)}ms", "-D", f"{round(seconds * 1000)}ms",
                   "--log-file", str(log), "-d", str(body),
                   *(part for header in HEADERS for part in ("-H", header)), f"http://{target}{PATH}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if on_window_start is not None:
            time.sleep(max(0.0, started + warmup_s - time.perf_counter()))
            on_window_start()
        output, _ = load.communicate(timeout=warmup_s + seconds + 120)
        if on_window_end is not None:
            on_window_end()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if load.returncode != 0:
            raise RuntimeError(f"h2load exited with {load.returncode}: {output[-1500:]}")
        rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else np.zeros((0, 3), np.int64)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", output)
    traffic = re.search(r"traffic: .*?, .*? headers .*?, [^(]*\((\d+)\) data", output)
    if counts is None or traffic is None:
        raise RuntimeError(f"h2load's summary not understood: {output[-1500:]}")
    ok = rows[rows[:, 1] == 200] if len(rows) else rows
    if not len(ok):
        raise RuntimeError(f"h2load completed no request in the window: {output[-1500:]}")
    # Body bytes of the whole run, warm-up included (the log holds the window only).
    bodies = int(traffic.group(1)) // (response_bytes + 5)
    if bodies < len(ok):
        raise ProbeFailed(f"{len(ok)} requests answered but only {bodies} response bodies of {response_bytes + 5} "
                          "bytes: the others were gRPC errors")
    latencies_ms = ok[:, 2] / 1000.0
    return {
        "requests": int(len(ok)), "throughput_rps": len(ok) / seconds,
        "p50_ms": float(np.percentile(latencies_ms, 50)), "p99_ms": float(np.percentile(latencies_ms, 99)),
        "errors": max(int(counts.group(5)), int(len(rows) - len(ok))),
        "client_cpu_cores": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall,
        "window_s": seconds,
    }


def version() -> str:
    done = subprocess.run(["h2load", "--version"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()
