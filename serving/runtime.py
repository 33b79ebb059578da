"""ONNX Runtime sessions and execution-provider choice: the only module that imports onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime

from serving.errors import ModelLoadError

log = logging.getLogger(__name__)

# ONNX Runtime's tensor type strings -> the dtype names used in cards and the API.
_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool", "tensor(string)": "string",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    # An int per fixed axis, -1 per dynamic one.
    shape: tuple[int, ...]


def resolve_providers(device: str) -> list[str | tuple[str, dict]]:
    """Providers for `auto | cpu | cuda[:N]`; auto takes CUDA when this onnxruntime has it."""
    available = onnxruntime.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ModelLoadError(
                f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install rnnserve[gpu]"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxSession:
    """One loaded ONNX graph. Built from bytes so nothing is read beside the checked file."""

    def __init__(self, model_bytes: bytes, providers: list, intra_op_threads: int = 0, label: str = ""):
        options = onnxruntime.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            self._session = onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as error:  # ONNX Runtime raises its own exception types for bad graphs
            raise ModelLoadError(f"{label}: ONNX Runtime cannot load it: {error}") from error
        self.provider = self._session.get_providers()[0]
        self.inputs = [self._info(node) for node in self._session.get_inputs()]
        self.outputs = [self._info(node) for node in self._session.get_outputs()]

    @staticmethod
    def _info(node) -> TensorInfo:
        shape = tuple(dim if isinstance(dim, int) else -1 for dim in node.shape)
        return TensorInfo(name=node.name, dtype=_DTYPES.get(node.type, node.type), shape=shape)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> list[np.ndarray]:
        return self._session.run(output_names, feeds)
