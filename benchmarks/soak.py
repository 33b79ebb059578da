"""Soak: a bounded mixed load against a real `rnnserve serve` process for a while, then a verdict.

    python benchmarks/soak.py --seconds 60        (make soak; make soak SOAK_SECONDS=600 for 10 min)

Client threads loop over typed and KServe unary calls (text and audio), batch requests, text
and audio streams (typed Stream and KServe sequences) and bad requests. Every answer is checked:
good requests must succeed with a plausible answer, bad ones must get their documented code.
The server's resident memory (/proc/PID/status VmRSS) is read when the warm-up ends and at the
end. Exit 1 when any answer was unexpected or RSS grew by more than --rss-growth-pct (5 %).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.grpc.client import RnnServeClient, stream_requests  # noqa: E402

TEXTS = [
    "what a wonderful flight, the crew was great and the food was lovely",
    "@united lost my bags AGAIN!!! worst airline ever https://t.co/abc123 #fail",
    "Delayed 3 hours in Chicago... at least the lounge had coffee. Thanks, I guess?",
    "the central bank raised interest rates again as markets slid",
    "ok",
]
RATE = 16000


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def start_server(models: Path) -> tuple[subprocess.Popen, str, Path]:
    log_path = Path(tempfile.mkstemp(prefix="rnnserve-soak-", suffix=".log")[1])
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--models", str(models), "--port", "0"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (match := re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(log_path.read_text()[-3000:])
        time.sleep(0.1)
    return server, f"127.0.0.1:{match.group(1)}", log_path


class Expected(Exception):
    """A bad request got the wrong answer (or none)."""


def _expect_code(code: grpc.StatusCode, call) -> None:
    try:
        call()
    except grpc.RpcError as error:
        if error.code() != code:
            raise Expected(f"expected {code.name}, got {error.code().name}: {error.details()}") from None
        return
    raise Expected(f"expected {code.name}, the call succeeded")


class Load:
    def __init__(self, target: str, seconds: float, seed: int):
        import tritonclient.grpc as triton

        self.triton = triton
        self.target, self.stop_at = target, time.monotonic() + seconds
        self.rng = np.random.default_rng(seed)
        audio_rng = np.random.default_rng(seed + 1)
        self.clips = [(0.2 * np.sin(2 * np.pi * f * np.arange(RATE) / RATE)
                       + 0.01 * audio_rng.standard_normal(RATE)).astype(np.float32) for f in (220, 440, 880)]
        self.counts: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.sequence = 0

    # -- one request of each kind; each raises on an unexpected answer ------------------------
    def typed_text(self, client, kserve) -> None:
        texts = list(self.rng.choice(TEXTS, size=int(self.rng.integers(1, 4))))
        results = client.classify("sentiment", texts, top_k=2)
        assert len(results) == len(texts) and all(len(r.top) == 2 for r in results)

    def typed_batch(self, client, kserve) -> None:
        texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(48)]
        results = client.classify("topic", texts)
        assert len(results) == 48 and all(abs(sum(r.probabilities) - 1) < 1e-3 for r in results)

    def typed_audio(self, client, kserve) -> None:
        results = client.classify_audio("keywords", self.clips[:2], sample_rate_hz=RATE)
        assert len(results) == 2 and all(r.label for r in results)

    def kserve_text(self, client, kserve) -> None:
        tensor = self.triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:2]], dtype=object))
        result = kserve.infer("sentiment", [tensor])
        assert result.as_numpy("probabilities").shape == (2, 3)

    def kserve_audio(self, client, kserve) -> None:
        tensor = self.triton.InferInput("audio", [1, RATE], "FP32")
        tensor.set_data_from_numpy(self.clips[2][None])
        assert kserve.infer("keywords", [tensor]).as_numpy("label")[0]

    def text_stream(self, client, kserve) -> None:
        text = TEXTS[int(self.rng.integers(0, 4))]
        cuts = sorted({0, len(text), *self.rng.integers(0, len(text), 4).tolist()})
        fragments = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        responses = list(client.stream("sentiment", fragments))
        assert len(responses) == len(fragments) + 1 and responses[-1].final

    def audio_stream(self, client, kserve) -> None:
        clip = self.clips[int(self.rng.integers(0, 3))]
        chunks = [clip[i : i + 1600] for i in range(0, RATE, 1600)]
        final = list(client.stream("keywords", chunks, sample_rate_hz=RATE, report_every_ms=500))[-1]
        assert final.final and abs(final.stream_ms - 1000) < 1e-6

    def kserve_sequence(self, client, kserve) -> None:
        with self.lock:
            self.sequence += 1
            sequence_id = self.sequence
        parts = ["what a ", "wonderful ", "flight"]
        for index, part in enumerate(parts):
            tensor = self.triton.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([part.encode()], dtype=object))
            result = kserve.infer("sentiment", [tensor], sequence_id=sequence_id, sequence_start=index == 0,
                                  sequence_end=index == len(parts) - 1)
        assert result.as_numpy("label")[0].decode() in ("negative", "neutral", "positive")

    def bad(self, client, kserve) -> None:
        kind = int(self.rng.integers(0, 6))
        if kind == 0:
            _expect_code(grpc.StatusCode.NOT_FOUND, lambda: client.classify("no-such-model", ["hi"]))
        elif kind == 1:
            _expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.classify("sentiment", ["  "]))
        elif kind == 2:
            chunk_first = list(stream_requests("", ["hello"]))[1:]
            _expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(client.stub.Stream(iter(chunk_first),
                                                                                           timeout=30)))
        elif kind == 3:
            _expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.classify("sentiment", ["x" * 5000]))
        elif kind == 4:
            tensor = self.triton.InferInput("text", [1], "FP32")
            tensor.set_data_from_numpy(np.zeros(1, np.float32))
            self._expect_triton("INVALID_ARGUMENT", lambda: kserve.infer("sentiment", [tensor]))
        else:
            tensor = self.triton.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b"orphan"], dtype=object))
            self._expect_triton("INVALID_ARGUMENT", lambda: kserve.infer(
                "sentiment", [tensor], sequence_id=f"never-started-{self.rng.integers(1 << 30)}"))

    def _expect_triton(self, code: str, call) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            call()
        except InferenceServerException as error:
            if error.status() != f"StatusCode.{code}":
                raise Expected(f"expected {code}, got {error.status()}: {error.message()}") from None
            return
        raise Expected(f"expected {code}, the call succeeded")

    KINDS = ["typed_text", "typed_batch", "typed_audio", "kserve_text", "kserve_audio", "text_stream",
             "audio_stream", "kserve_sequence", "bad"]

    def worker(self, index: int) -> None:
        kserve = self.triton.InferenceServerClient(self.target)
        with RnnServeClient(self.target) as client:
            position = index
            while time.monotonic() < self.stop_at:
                kind = self.KINDS[position % len(self.KINDS)]
                position += 1
                try:
                    getattr(self, kind)(client, kserve)
                except Exception as error:  # every unexpected answer is reported, never hidden
                    with self.lock:
                        self.errors.append(f"{kind}: {type(error).__name__}: {error}"[:300])
                with self.lock:
                    self.counts[kind] += 1
        kserve.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="load duration after the warm-up (default 60)")
    parser.add_argument("--warmup-s", type=float, default=10, help="warm-up load before the first RSS reading")
    parser.add_argument("--threads", type=int, default=6, help="client threads (default 6)")
    parser.add_argument("--rss-growth-pct", type=float, default=5.0, help="allowed RSS growth (default 5 %%)")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    server, target, log_path = start_server(args.models)
    try:
        warm = Load(target, args.warmup_s, seed=0)
        threads = [threading.Thread(target=warm.worker, args=(i,)) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(1)
        rss_start = rss_mb(server.pid)
        load = Load(target, args.seconds, seed=1)
        started = time.monotonic()
        threads = [threading.Thread(target=load.worker, args=(i,)) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        time.sleep(1)
        rss_end = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = None

    errors = warm.errors + load.errors
    growth = 100 * (rss_end - rss_start) / rss_start
    log = log_path.read_text()
    server_errors = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
    summary = {
        "seconds": round(elapsed, 1), "threads": args.threads, "requests": dict(load.counts),
        "requests_total": sum(load.counts.values()), "warmup_requests": sum(warm.counts.values()),
        "requests_per_s": round(sum(load.counts.values()) / elapsed, 1), "errors": len(errors),
        "first_errors": errors[:10], "server_log_errors": server_errors[:10], "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1), "rss_growth_pct": round(growth, 2), "server_exit_code": exit_code,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    failures = []
    if errors:
        failures.append(f"{len(errors)} unexpected answers")
    if server_errors:
        failures.append(f"{len(server_errors)} errors in the server log ({log_path})")
    if not alive or exit_code != 0:
        failures.append(f"server alive={alive}, exit code {exit_code}")
    if growth >= args.rss_growth_pct:
        failures.append(f"RSS grew {growth:.1f} % (limit {args.rss_growth_pct} %)")
    if not all(load.counts[kind] for kind in Load.KINDS):
        failures.append(f"some request kinds never ran: {dict(load.counts)}")
    print("soak: " + ("; ".join(failures) if failures else "OK"), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
