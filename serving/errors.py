"""Typed errors raised where a problem is found; serving/grpc/status.py maps them to status codes."""

from __future__ import annotations


class ServingError(Exception):
    """Base class: `code` names the gRPC status (by its enum name) the error maps to."""

    code = "INTERNAL"


class ModelNotFound(ServingError):
    code = "NOT_FOUND"


class InvalidInput(ServingError):
    """A client mistake: the message names the field and the limit."""

    code = "INVALID_ARGUMENT"


class ModelNotReady(ServingError):
    code = "UNAVAILABLE"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The client's deadline passed before the work started; it was dropped."""

    code = "DEADLINE_EXCEEDED"


class ModelLoadError(Exception):
    """A model version cannot be loaded; the message names the file and the problem."""
