"""Register a servicer so that undecodable request bytes become INVALID_ARGUMENT, and so that
a shutdown can finish the unary calls in flight before the front closes.

The generated `add_*_to_server` helpers let a protobuf DecodeError (for example a
string field holding invalid UTF-8) escape as UNKNOWN. Here each method gets a
deserializer that never raises; the handler then aborts with INVALID_ARGUMENT,
naming the message type and the decoder's complaint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError


class UndecodableRequest:
    def __init__(self, type_name: str, error: DecodeError, field: str | None = None):
        where = f" ({field}: not valid UTF-8)" if field else ""
        self.message = f"request is not a valid {type_name}{where}: {error}"


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = data[position]  # IndexError past the end: the caller gives up
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise IndexError("varint too long")


def invalid_utf8_field(descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (e.g. `texts[1]`, `chunk.text`) of the first string field holding invalid UTF-8
    in the wire bytes of a `descriptor` message, or None when none is found. The decoder's own
    error does not say which field it was."""
    seen: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
                continue
            if wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                seen[number] = seen.get(number, -1) + 1
                name += f"[{seen[number]}]"
            if field.type == field.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == field.TYPE_MESSAGE:
                found = invalid_utf8_field(field.message_type, value, name + ".")
                if found:
                    return found
    except IndexError:
        return None
    return None


class Drain:
    """The calls in flight on one server, and whether it has begun to shut down.

    Once `close` is called every new call (of any shape) is refused with UNAVAILABLE, `wait`
    returns when the unary calls already running have answered, and `end_streams` gives the
    open streams what is left of the grace period, then ends each with UNAVAILABLE itself.

    The server shuts down through it rather than through the front alone:
    - pygrpc-native's stop cut off some answers still being computed (clients saw GOAWAY,
      "Stream removed"), so the front is stopped only after the calls are done
      (serving.grpc.server.RunningServer.stop);
    - grpcio's stop ends a stream still open at the end of the grace period by cancelling its
      task, which now and then escaped grpcio's own handling and was logged as an unhandled
      CancelledError with a traceback; a stream ended here gets a status that says why.
    """

    MESSAGE = "the server is shutting down"
    STREAM_ENDED = "the server is shutting down: the stream was still open at the end of the grace period"

    def __init__(self) -> None:
        self.closing = False
        self.calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._streams: set[asyncio.Task] = set()
        self._streams_idle = asyncio.Event()
        self._streams_idle.set()
        self._ending: set[asyncio.Task] = set()

    def close(self) -> None:
        self.closing = True

    async def wait(self, timeout_s: float) -> bool:
        """True when no unary call is left within timeout_s."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def refuse_if_closing(self, context: grpc.aio.ServicerContext) -> None:
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.MESSAGE)

    def enter(self) -> None:
        self.calls += 1
        self._idle.clear()

    def leave(self) -> None:
        self.calls -= 1
        if not self.calls:
            self._idle.set()

    def open_stream(self) -> asyncio.Task:
        """Counts the streaming call running in this task until `close_stream`."""
        task = asyncio.current_task()
        self._streams.add(task)
        self._streams_idle.clear()
        return task

    def close_stream(self, task: asyncio.Task) -> None:
        self._streams.discard(task)
        self._ending.discard(task)
        if not self._streams:
            self._streams_idle.set()

    def ended_by_shutdown(self, task: asyncio.Task) -> bool:
        return task in self._ending

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def end_streams(self, timeout_s: float) -> int:
        """Waits up to timeout_s for the open streams to end, then ends the rest (their handlers
        answer UNAVAILABLE, STREAM_ENDED) and waits for them; returns how many were ended."""
        if self._streams and timeout_s > 0:
            try:
                await asyncio.wait_for(self._streams_idle.wait(), timeout_s)
            except TimeoutError:
                pass
        left = list(self._streams)
        for task in left:
            self._ending.add(task)
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5.0)
        return len(left)


def _deserializer(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            try:
                field = invalid_utf8_field(message_class.DESCRIPTOR, data) if "UTF-8" in str(error) else None
            except Exception:  # naming the field is a courtesy: it must never fail the call itself
                field = None
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, error, field)

    return parse


async def _checked(request, context: grpc.aio.ServicerContext):
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request


async def _checked_stream(requests: AsyncIterator, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield await _checked(request, context)


@contextlib.asynccontextmanager
async def _open_stream(drain: Drain, context: grpc.aio.ServicerContext):
    """A streaming call, counted by the drain while it runs. Cancelled by the drain at the end of
    the grace period it answers UNAVAILABLE; any other cancellation (the client's, or its
    deadline) goes on as one."""
    task = drain.open_stream()
    try:
        yield
    except asyncio.CancelledError:
        if drain.ended_by_shutdown(task):
            task.uncancel()
            await context.abort(grpc.StatusCode.UNAVAILABLE, Drain.STREAM_ENDED)
        raise
    finally:
        drain.close_stream(task)


def _handler(method, implementation, drain: Drain):
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
                await drain.refuse_if_closing(context)
                async with _open_stream(drain, context):
                    async for response in implementation(_checked_stream(requests, context), context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **codec)

        async def stream_in(requests, context):
            await drain.refuse_if_closing(context)
            async with _open_stream(drain, context):
                return await implementation(_checked_stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_in, **codec)
    if method.server_streaming:
        async def unary_in_stream_out(request, context):
            await drain.refuse_if_closing(context)
            async with _open_stream(drain, context):
                request = await _checked(request, context)
                async for response in implementation(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_in_stream_out, **codec)

    async def unary(request, context):
        await drain.refuse_if_closing(context)
        drain.enter()
        try:
            return await implementation(await _checked(request, context), context)
        finally:
            drain.leave()

    return grpc.unary_unary_rpc_method_handler(unary, **codec)


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, drain: Drain) -> None:
    """Serve every method of `service` from the servicer's method of the same name; `drain`
    counts its unary calls and refuses new calls once the server shuts down."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name), drain) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # As generated code does since grpcio 1.64: registered methods skip grpcio's generic lookup, and
    # they are the ones the native front serves itself (it hands generic-only services to grpcio).
    server.add_registered_method_handlers(service.full_name, handlers)
