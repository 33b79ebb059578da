"""End-to-end check of the CUDA path on a GPU host: needs only numpy and an onnxruntime with the
CUDA execution provider (onnxruntime-gpu), plus this repository's models/ folder.

    python benchmarks/gpu_check.py [--models models] [--report gpu_check.json]

For every model version with a card it checks that `--device auto` and `--device cuda` pick
CUDAExecutionProvider, that model.onnx gives the same logits on CUDA as on CPU (max abs
difference, identical labels), that step.onnx streamed in chunks on CUDA equals model.onnx in
one shot, and it measures throughput (sequences per second) on both providers, side by side in
the same run. Exits non-zero when CUDA is missing or a parity check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.runtime import cuda_unavailable, resolve_providers  # noqa: E402  (numpy + onnxruntime only)

TOLERANCE = 1e-3  # CUDA kernels sum in another order than CPU ones


def _session(path: Path, providers) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(path.read_bytes(), providers=providers)


def _inputs(card: dict, batch: int, steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    first = card["inputs"][0]
    if first["dtype"] == "int64":
        vocab = int(card["architecture"].get("vocab_size", 1000))
        inputs = rng.integers(1, vocab, (batch, steps)).astype(np.int64)
    else:
        inputs = rng.standard_normal((batch, steps, int(first["shape"][-1]))).astype(np.float32) * 3 - 8
    lengths = rng.integers(max(1, steps // 2), steps + 1, batch).astype(np.int64)
    lengths[0] = steps
    return inputs, lengths


def _throughput(session, feeds: dict, seconds: float = 3.0) -> float:
    session.run(["logits"], feeds)  # warm-up (CUDA kernels, memory arena)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(["logits"], feeds)
        count += 1
    return count * len(feeds["lengths"]) / (time.perf_counter() - started)


def _stream(session, card: dict, inputs: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    spec = card["streaming"]
    name = spec["inputs"][0]["name"]
    state = {s["name"]: np.full((len(lengths), *s["shape"]), s["initial"], np.float32) for s in spec["state"]}
    final = np.zeros((len(lengths), len(card["labels"])), np.float32)
    for start in range(0, inputs.shape[1], chunk):
        rows = np.flatnonzero(lengths > start)
        if rows.size == 0:
            break
        piece = inputs[rows, start : start + chunk]
        feeds = {name: piece, "lengths": np.minimum(lengths[rows] - start, piece.shape[1]).astype(np.int64)}
        feeds.update({key: value[rows] for key, value in state.items()})
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        final[rows] = outputs["logits"]
        for s in spec["state"]:
            state[s["name"]][rows] = outputs[s["output"]]
    return final


def check_version(folder: Path, cuda, rng: np.random.Generator) -> dict:
    card = json.loads((folder / "model.json").read_text())
    cpu_session = _session(folder / "model.onnx", ["CPUExecutionProvider"])
    cuda_session = _session(folder / "model.onnx", cuda)
    steps = 49 if card["inputs"][0]["dtype"] == "float32" else 64
    inputs, lengths = _inputs(card, 256, steps, rng)
    feeds = {card["inputs"][0]["name"]: inputs, "lengths": lengths}
    (cpu_logits,) = cpu_session.run(["logits"], feeds)
    (cuda_logits,) = cuda_session.run(["logits"], feeds)
    result = {
        "model": f"{folder.parent.name}/{folder.name}",
        "provider": cuda_session.get_providers()[0],
        "cuda_vs_cpu_max_abs_diff": float(np.abs(cpu_logits - cuda_logits).max()),
        "labels_identical": bool(np.array_equal(cpu_logits.argmax(1), cuda_logits.argmax(1))),
    }
    if card.get("streaming"):
        step_session = _session(folder / card["streaming"]["graph"], cuda)
        streamed = _stream(step_session, card, inputs, lengths, chunk=7)
        result["step_cuda_vs_model_cpu_max_abs_diff"] = float(np.abs(streamed - cpu_logits).max())
    for batch in (1, 64, 256):
        small = {key: value[:batch] for key, value in feeds.items()}
        result[f"cpu_seq_per_s_b{batch}"] = round(_throughput(cpu_session, small), 1)
        result[f"cuda_seq_per_s_b{batch}"] = round(_throughput(cuda_session, small), 1)
    result["steps_per_sequence"] = steps
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--report", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", default="cuda",
                        help="provider to check against CPU (default cuda; cpu dry-runs the script anywhere)")
    args = parser.parse_args()
    available = onnxruntime.get_available_providers()
    report = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "available_providers": available,
        "cuda_probe": cuda_unavailable(0) or "GPU 0 answers",
        "auto_providers": [p if isinstance(p, str) else p[0] for p in resolve_providers("auto")],
        "models": [],
        "failures": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("models", "failures")}, indent=2))
    expected = "CPUExecutionProvider" if args.device == "cpu" else "CUDAExecutionProvider"
    if expected not in available:
        report["failures"].append("this onnxruntime has no CUDAExecutionProvider")
    else:
        cuda = list(resolve_providers(args.device))
        rng = np.random.default_rng(0)
        for card_path in sorted(args.models.glob("*/*/model.json")):
            try:
                result = check_version(card_path.parent, cuda, rng)
            except Exception as error:  # report every model, then fail
                report["failures"].append(f"{card_path.parent}: {error.__class__.__name__}: {error}")
                continue
            report["models"].append(result)
            print(json.dumps(result))
            if result["provider"] != expected:
                report["failures"].append(f"{result['model']}: session runs on {result['provider']}")
            if result["cuda_vs_cpu_max_abs_diff"] > TOLERANCE or not result["labels_identical"]:
                report["failures"].append(f"{result['model']}: CUDA and CPU disagree")
            if result.get("step_cuda_vs_model_cpu_max_abs_diff", 0.0) > TOLERANCE:
                report["failures"].append(f"{result['model']}: streamed CUDA result differs from one-shot CPU")
    args.report.write_text(json.dumps(report, indent=2))
    for failure in report["failures"]:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
