"""rnnserve serving: model repository, ONNX Runtime execution and the gRPC server (no torch)."""

__version__ = "0.1.0"
