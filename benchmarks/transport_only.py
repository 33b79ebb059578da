"""The transport-only peer of the stream benchmarks: a Python gRPC server with no model and no
audio work, answering every RnnServe.Stream chunk with an empty response (only its chunk count)
and every ModelStreamInfer request with an empty one. It is the ceiling of the transport and
the client on this machine.

    python benchmarks/transport_only.py PORT_FILE     # binds 127.0.0.1:0, writes the port there
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve(port_file: Path) -> None:
    import grpc

    from serving.grpc.generated.inference import inference_pb2 as kserve
    from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb

    async def stream(requests, context):
        chunks = 0
        async for request in requests:
            if request.HasField("chunk"):
                chunks += 1
                yield pb.StreamResponse(chunks=chunks)
        yield pb.StreamResponse(chunks=chunks, final=True)

    async def stream_infer(requests, context):
        async for request in requests:
            yield kserve.ModelStreamInferResponse(infer_response=kserve.ModelInferResponse(id=request.id))

    def handlers(service: str, method: str, behaviour, request_type, response_type):
        handler = grpc.stream_stream_rpc_method_handler(behaviour, request_deserializer=request_type.FromString,
                                                        response_serializer=response_type.SerializeToString)
        return grpc.method_handlers_generic_handler(service, {method: handler})

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([
            handlers("rnnserve.v1.RnnServe", "Stream", stream, pb.StreamRequest, pb.StreamResponse),
            handlers("inference.GRPCInferenceService", "ModelStreamInfer", stream_infer, kserve.ModelInferRequest,
                     kserve.ModelStreamInferResponse),
        ])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(run())


def start() -> tuple[subprocess.Popen, str]:
    """The server in its own process and session; returns it and its target once it listens."""
    port_file = Path(tempfile.mkdtemp()) / "port"
    server = subprocess.Popen([sys.executable, __file__, str(port_file)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the transport-only server did not start")
        time.sleep(0.1)
    return server, f"127.0.0.1:{port_file.read_text()}"


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
