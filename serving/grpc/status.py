"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from serving.errors import ServingError

log = logging.getLogger(__name__)
T = TypeVar("T")


def status_code(error: ServingError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


async def run_call(context: grpc.aio.ServicerContext, work: Callable[[], T], executor=None) -> T:
    """Run blocking data-plane work off the event loop; typed errors abort with their status."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, work)
    except ServingError as error:
        await context.abort(status_code(error), str(error))
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")
    raise AssertionError("unreachable: context.abort raises")
