"""INT8 dynamic quantization of the batch graph, shipped only where it pays.

ONNX Runtime's dynamic quantization rewrites LSTM nodes to DynamicQuantizeLSTM (int8 weights),
MatMul/Gemm nodes to their integer forms and the embedding table to int8 (dequantized after the
Gather); it has no GRU entry, so a GRU model keeps its recurrence in fp32.
Export measures both graphs side by side on the whole held-out split
(accuracy, and wall time per example on this machine) and ships `model.int8.onnx` only when
accuracy drops by at most MAX_ACCURACY_DROP and the int8 graph is at least MIN_SPEEDUP faster or
at most MAX_SIZE_RATIO of the fp32 file's size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from serving.card import QuantizationInfo

MAX_ACCURACY_DROP = 0.005
MIN_SPEEDUP = 1.05
MAX_SIZE_RATIO = 0.5
METHOD = "dynamic int8 (onnxruntime.quantization.quantize_dynamic, signed int8 weights, per tensor)"


def _score(session: onnxruntime.InferenceSession, batches) -> tuple[np.ndarray, float]:
    """Predicted classes over all batches and the best of three timed passes (seconds)."""
    input_name = session.get_inputs()[0].name
    best, predictions = float("inf"), None
    for _ in range(3):
        started = time.perf_counter()
        outputs = [session.run(["logits"], {input_name: inputs, "lengths": lengths})[0] for inputs, lengths in batches]
        best = min(best, time.perf_counter() - started)
        predictions = np.concatenate([o.argmax(axis=1) for o in outputs])
    return predictions, best


def quantize_and_measure(model_path: Path, int8_path: Path, batches, labels: np.ndarray) -> QuantizationInfo:
    """Write int8_path, measure it against model_path on (inputs, lengths) batches whose rows
    are labelled by `labels` in order, and delete it again unless it pays."""
    # Constant folding first: the quantizer rewrites an LSTM only when its weights are plain
    # initializers, and the exporter computes them from the PyTorch layout inside the graph.
    with tempfile.TemporaryDirectory() as scratch:
        folded = Path(scratch) / "folded.onnx"
        quant_pre_process(str(model_path), str(folded), skip_symbolic_shape=True)
        quantize_dynamic(str(folded), str(int8_path), weight_type=QuantType.QInt8)
    quantized_ops = sorted({
        node.op_type for node in onnx.load(str(int8_path)).graph.node
        if node.op_type.startswith(("DynamicQuantize", "MatMulInteger", "QLinear", "ConvInteger"))
        or node.op_type in ("DynamicQuantizeLinear", "MatMulIntegerToFloat")
    })
    options = onnxruntime.SessionOptions()
    fp32 = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    int8 = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    fp32_predictions, fp32_seconds = _score(fp32, batches)
    int8_predictions, int8_seconds = _score(int8, batches)
    count = len(labels)
    fp32_accuracy = float(np.mean(fp32_predictions == labels))
    accuracy = float(np.mean(int8_predictions == labels))
    speedup = fp32_seconds / int8_seconds
    int8_size = int8_path.stat().st_size
    size_ratio = int8_size / model_path.stat().st_size
    problems, notes = [], []
    if fp32_accuracy - accuracy > MAX_ACCURACY_DROP:
        problems.append(f"accuracy drops by {fp32_accuracy - accuracy:.4f} (limit {MAX_ACCURACY_DROP})")
    if speedup < MIN_SPEEDUP and size_ratio > MAX_SIZE_RATIO:
        problems.append(f"{speedup:.2f}x the fp32 speed and {size_ratio:.0%} of its size "
                        f"(needs {MIN_SPEEDUP}x or {MAX_SIZE_RATIO:.0%})")
    if "DynamicQuantizeLSTM" not in quantized_ops and any(
        node.op_type == "GRU" for node in onnx.load(str(model_path)).graph.node
    ):
        notes.append("ONNX Runtime does not quantize GRU: only the head is int8")
    shipped = not problems
    if shipped:
        notes.insert(0, f"shipped: accuracy kept, {speedup:.2f}x the fp32 speed, {size_ratio:.0%} of its size")
    else:
        int8_path.unlink()
    return QuantizationInfo(
        method=METHOD,
        quantized_ops=quantized_ops,
        shipped=shipped,
        file=int8_path.name if shipped else None,
        examples=count,
        accuracy=round(accuracy, 4),
        fp32_accuracy=round(fp32_accuracy, 4),
        us_per_example=round(int8_seconds / count * 1e6, 1),
        fp32_us_per_example=round(fp32_seconds / count * 1e6, 1),
        speedup=round(speedup, 2),
        size_bytes=int8_size,
        fp32_size_bytes=model_path.stat().st_size,
        note="; ".join(problems + notes),
    )
