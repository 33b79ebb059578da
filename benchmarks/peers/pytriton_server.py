"""PyTriton (a real Triton server) serving the peer model with ONNX Runtime in its Python
backend: dynamic batching, max batch 32, 5 ms queue delay. Runs in its own venv.

    python pytriton_server.py MODEL.onnx GRPC_PORT [INSTANCES [INTRA_OP_THREADS]]

INSTANCES (default 1) model instances, each its own ONNX Runtime session with INTRA_OP_THREADS
threads (default 0: ONNX Runtime's own choice); PyTriton runs one instance per inference callable.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def instance(model_path: str, intra_op_threads: int):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    @batch
    def infer(ids):
        return {"logits": session.run(["logits"], {"ids": ids.astype(np.int64)})[0]}

    return infer


def main() -> None:
    model_path, grpc_port = sys.argv[1], int(sys.argv[2])
    instances = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    intra_op_threads = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    # Triton binds 0.0.0.0 unless told otherwise; the benchmark talks to it on loopback only.
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1",
                          http_port=grpc_port + 1, metrics_address="127.0.0.1", metrics_port=grpc_port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="lstm", infer_func=[instance(model_path, intra_op_threads) for _ in range(instances)],
            inputs=[Tensor(name="ids", dtype=np.int64, shape=(64,))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(3,))],
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=5000)),
        )
        triton.serve()


if __name__ == "__main__":
    main()
