"""Register a servicer so that undecodable request bytes become INVALID_ARGUMENT.

The generated `add_*_to_server` helpers let a protobuf DecodeError (for example a
string field holding invalid UTF-8) escape as UNKNOWN. Here each method gets a
deserializer that never raises; the handler then aborts with INVALID_ARGUMENT,
naming the message type and the decoder's complaint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError


class UndecodableRequest:
    def __init__(self, type_name: str, error: DecodeError):
        self.message = f"request is not a valid {type_name}: {error}"


def _deserializer(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, error)

    return parse


async def _checked(request, context: grpc.aio.ServicerContext):
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request


async def _checked_stream(requests: AsyncIterator, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield await _checked(request, context)


def _handler(method, implementation):
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    codec = {
        "request_deserializer": _deserializer(request_class),
        "response_serializer": response_class.SerializeToString,
    }
    if method.client_streaming:
        # grpc.aio tells async handlers from sync ones by their function type, so each shape
        # gets a wrapper of the right kind.
        if method.server_streaming:
            async def stream_in_stream_out(requests, context):
                async for response in implementation(_checked_stream(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **codec)

        async def stream_in(requests, context):
            return await implementation(_checked_stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_in, **codec)
    if method.server_streaming:
        async def unary_in_stream_out(request, context):
            request = await _checked(request, context)
            async for response in implementation(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_in_stream_out, **codec)

    async def unary(request, context):
        return await implementation(await _checked(request, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, **codec)


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Serve every method of `service` from the servicer's method of the same name."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
