"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from serving.errors import ServingError
from serving.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


def status_code(error: ServingError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


async def run_call(
    context: grpc.aio.ServicerContext, work: Callable[[], T], executor=None, metrics: Metrics | None = None,
    method: str = "", model: str = "",
) -> T:
    """Run blocking data-plane work off the event loop; typed errors abort with their status.
    With metrics, the call is counted by method, model and status code, and timed."""
    future = asyncio.get_running_loop().run_in_executor(executor, work)
    return await run_async_call(context, future, metrics, method, model)


async def run_async_call(
    context: grpc.aio.ServicerContext, work, metrics: Metrics | None = None, method: str = "", model: str = ""
):
    """run_call for a coroutine that runs on the event loop (stream steps await their batcher)."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return await work
    except ServingError as error:
        code = status_code(error)
        await context.abort(code, str(error))
    except asyncio.CancelledError:  # the client's deadline passed, or it went away: work abandoned
        remaining = context.time_remaining()
        code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
        raise
    except Exception:
        log.exception("unexpected error")
        code = grpc.StatusCode.INTERNAL
        await context.abort(code, "internal server error; see the server log")
    finally:
        if metrics is not None:
            metrics.count_request(method, model, code.name, time.perf_counter() - started)
    raise AssertionError("unreachable: context.abort raises")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
