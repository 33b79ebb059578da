"""The do-nothing peer of the server benchmarks: a bare Python gRPC server (grpc.aio) with no
model, no batching and no audio work, what one Python gRPC process costs per call on this
machine, the least any Python gRPC server pays.

- KServe v2 ModelInfer (servers.py's transport floor, under h2load): every request, not parsed,
  gets the same prebuilt response bytes (--response; an empty response without it).
- RnnServe.Stream (streams.py and stream_load.py: the transport-only server, the ceiling of the
  transport and the client): every chunk gets an empty response (only its chunk count);
  ModelStreamInfer: every request an empty response with its id.

    python benchmarks/transport_only.py --port-file FILE             # binds 127.0.0.1:0, writes the port to FILE
    python benchmarks/transport_only.py --port PORT --response FILE  # binds 127.0.0.1:PORT; ModelInfer answers FILE
    python benchmarks/transport_only.py --port-file FILE --front native  # on pygrpc-native, as rnnserve's native front

With --front native the server is pygrpc-native's aio server, as rnnserve's default front: unary
calls (ModelInfer, KServe sequences over unary calls) are served in Rust, the streaming methods
by the grpcio server behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve(port: int, port_file: Path | None, response: bytes, front: str = "grpcio") -> None:
    import grpc

    from serving.grpc.generated.inference import inference_pb2 as kserve
    from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb

    async def model_infer(request: bytes, context) -> bytes:
        return response

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

    def streaming(behaviour, request_type, response_type):
        return grpc.stream_stream_rpc_method_handler(behaviour, request_deserializer=request_type.FromString,
                                                     response_serializer=response_type.SerializeToString)

    async def run() -> None:
        if front == "native":
            import pygrpc_native.aio

            server = pygrpc_native.aio.server()
        else:
            server = grpc.aio.server()
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("rnnserve.v1.RnnServe", {
                "Stream": streaming(stream, pb.StreamRequest, pb.StreamResponse)}),
            grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
                # No (de)serializers: the request arrives as bytes and the bytes go back as they are.
                "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
                "ModelStreamInfer": streaming(stream_infer, kserve.ModelInferRequest, kserve.ModelStreamInferResponse),
            }),
        ])
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        if port and bound != port:
            raise SystemExit(f"could not bind 127.0.0.1:{port}")
        await server.start()
        if port_file is not None:
            port_file.write_text(str(bound))
        await server.wait_for_termination()

    asyncio.run(run())


def start(front: str = "grpcio") -> tuple[subprocess.Popen, str]:
    """The server in its own process and session; returns it and its target once it listens."""
    port_file = Path(tempfile.mkdtemp()) / "port"
    server = subprocess.Popen([sys.executable, __file__, "--port-file", str(port_file), "--front", front],
                              start_new_session=True)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the transport-only server did not start")
        time.sleep(0.1)
    return server, f"127.0.0.1:{port_file.read_text()}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free one)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once it listens")
    parser.add_argument("--response", type=Path, help="the bytes ModelInfer answers every request with")
    parser.add_argument("--front", choices=("grpcio", "native"), default="grpcio",
                        help="grpc.aio (default) or pygrpc-native's aio server")
    args = parser.parse_args()
    serve(args.port, args.port_file, args.response.read_bytes() if args.response else b"", args.front)
