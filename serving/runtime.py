"""ONNX Runtime sessions and execution-provider choice: the only module that imports onnxruntime."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

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


GRAPH_OPTIMIZATION = {
    "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def instance_defaults(cores: int, on_gpu: bool, instances: int = 0, intra_op_threads: int = 0) -> tuple[int, int]:
    """(instances, intra-op threads) for a model version, 0 meaning "choose" for either.

    On CPU: one thread per instance and one instance per core (at most MAX_AUTO_INSTANCES):
    recurrent operators split poorly over intra-op threads, so sessions side by side do more
    (measured: 2 sessions x 1 thread beat 1 x 2 on 2 cores, see README). When one of the two is
    given, the other fills the cores. On a GPU: one instance (ONNX Runtime's own default threads).
    """
    if on_gpu:
        return instances or 1, intra_op_threads
    if not instances:
        instances = max(1, min(MAX_AUTO_INSTANCES, cores // (intra_op_threads or 1)))
    if not intra_op_threads:
        intra_op_threads = max(1, cores // instances)
    return instances, intra_op_threads


# Each instance holds its own copy of the weights: the automatic choice stops here.
MAX_AUTO_INSTANCES = 8


@dataclass(frozen=True)
class RuntimeOptions:
    """How the sessions of a model version are built: providers, session options, instances."""

    providers: tuple = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    graph_optimization: str = "all"
    # ONNX Runtime's pool threads spin-wait for the next call by default: on a server, between
    # batches, that burns the cores the request path needs (measured in benchmarks/streams.py).
    intra_op_spinning: bool = False
    # ONNX Runtime sessions per graph, each run by its own thread (Triton's instance group).
    instances: int = 1
    # Intra-op threads of stream step graphs; 0: intra_op_threads, or one when that is 0.
    step_intra_op_threads: int = 0
    # Sessions of stream step graphs; 0: `instances`. A step call's own work besides ONNX Runtime
    # (audio front end, detector, padding) holds the interpreter lock, so a second step instance
    # mostly competes with the event loop (measured: README, "Model instances").
    step_instances: int = 0

    @property
    def on_gpu(self) -> bool:
        first = self.providers[0]
        return (first[0] if isinstance(first, tuple) else first) != "CPUExecutionProvider"

    def session_options(self) -> onnxruntime.SessionOptions:
        options = onnxruntime.SessionOptions()
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        options.graph_optimization_level = GRAPH_OPTIMIZATION[self.graph_optimization]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.intra_op_spinning else "0")
        return options

    def for_steps(self) -> RuntimeOptions:
        """Stream step graphs: a few frames of a few streams per call, too little work to split
        over threads, so one intra-op thread unless one was set explicitly; step_instances
        sessions."""
        return replace(self, intra_op_threads=self.step_intra_op_threads or self.intra_op_threads or 1,
                       instances=self.step_instances or self.instances)


CPU_DEFAULTS = RuntimeOptions()


def _probe_graph() -> bytes:
    """A one-node graph (y = x + x) to ask a provider whether it answers."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def cuda_unavailable(device_id: int = 0) -> str | None:
    """None when CUDA device `device_id` runs a graph through ONNX Runtime, else why not."""
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)})"
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the failure is reported here, not as an ORT warning
    try:
        session = onnxruntime.InferenceSession(
            _probe_graph(), sess_options=options,
            providers=[("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"],
        )
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return f"ONNX Runtime could not start CUDA device {device_id} and fell back to CPU"
        x = np.arange(4, dtype=np.float32)
        if not np.array_equal(session.run(None, {"x": x})[0], x + x):
            return f"CUDA device {device_id} returned a wrong result for a probe graph"
    except Exception as error:  # ONNX Runtime raises its own exception types
        return f"CUDA device {device_id} does not answer: {error}"
    return None


def resolve_providers(device: str) -> tuple:
    """Providers for `auto | cpu | cuda[:N]`.

    cuda[:N] must work or loading fails; auto takes CUDA device 0 when this onnxruntime
    offers it and the device runs a probe graph, else CPU. The choice is logged.
    """
    if device == "cpu":
        log.info("device cpu: CPUExecutionProvider")
        return ("CPUExecutionProvider",)
    if device.startswith("cuda"):
        device_id = int(device.split(":")[1]) if ":" in device else 0
        problem = cuda_unavailable(device_id)
        if problem:
            raise ModelLoadError(f"--device {device}: {problem}; install rnnserve[gpu] on a host with a GPU")
        log.info("device %s: CUDAExecutionProvider on GPU %d", device, device_id)
        return (("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider")
    problem = cuda_unavailable(0)
    if problem is None:
        log.info("device auto: CUDA answers, using CUDAExecutionProvider on GPU 0")
        return (("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider")
    log.info("device auto: using CPUExecutionProvider (%s)", problem)
    return ("CPUExecutionProvider",)


class OnnxSession:
    """One loaded ONNX graph. Built from bytes so nothing is read beside the checked file."""

    def __init__(self, model_bytes: bytes, runtime: RuntimeOptions = CPU_DEFAULTS, label: str = ""):
        try:
            self._session = onnxruntime.InferenceSession(
                model_bytes, sess_options=runtime.session_options(), providers=list(runtime.providers)
            )
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
