"""Optional bearer-token authentication for every RPC except health checks.

Clients send `authorization: Bearer <token>` metadata (tritonclient: headers=...). A missing
or wrong token gets UNAUTHENTICATED before any work is done; tokens are compared in
constant time. Health stays open so that orchestrators can probe without a secret.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, metrics=None):
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        # Refusals are counted (method, model "_unknown_": the request is never read, code).
        self._metrics = metrics

    def _refuse(self, handler, method: str, message: str) -> grpc.RpcMethodHandler:
        if self._metrics is not None:
            self._metrics.count_request(method.rsplit("/", 1)[-1], "", "UNAUTHENTICATED")
        return _refusal(handler, message)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        sent = metadata.get("authorization")
        method = handler_call_details.method
        if sent is None:
            return self._refuse(handler, method,
                                "authorization: missing; send 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(str(sent).encode(), self._expected):
            return self._refuse(handler, method, "authorization: wrong token")
        return handler
