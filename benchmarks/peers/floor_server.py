"""The transport floor: a bare grpc.aio server whose KServe v2 ModelInfer answers every request
with the same prebuilt response bytes. No parsing, no model, no batching: what one Python gRPC
process costs per call on this machine, the least any Python gRPC server pays.

    python floor_server.py RESPONSE_FILE GRPC_PORT      # binds 127.0.0.1 only
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc


async def serve(response: bytes, port: int) -> None:
    async def model_infer(request: bytes, context) -> bytes:
        return response

    # No (de)serializers: the request arrives as bytes and the bytes go back as they are.
    handler = grpc.unary_unary_rpc_method_handler(model_infer)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                          {"ModelInfer": handler})])
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise SystemExit(f"could not bind 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).read_bytes(), int(sys.argv[2])))
