"""Where `rnnserve score` runs the model: in this process, on a server, or on Ray actors.

Every engine takes a batch of rows and returns, per row, a prediction or the reason it was
refused. A batch the model refuses as a whole (INVALID_ARGUMENT) is split in halves until
the bad rows are found, so each row gets exactly the server's own validation message.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.scoring.readers import Row

# "texts[3]: empty text" -> "empty text": the row is named by the caller.
_FIELD_PREFIX = re.compile(r"^(texts|audio)\[\d+\](\.\w+)?: ")


class ScoringError(Exception):
    """The run cannot go on (model missing, server gone after retries)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Outcome:
    label: str | None = None
    score: float = 0.0
    probabilities: np.ndarray | None = None
    error: str | None = None


def _bisect(rows: list[Row], run, is_bad_input) -> list[Outcome]:
    """run(rows) -> outcomes; when the batch is refused as bad input, split to find the rows."""
    try:
        return run(rows)
    except Exception as error:
        if not is_bad_input(error):
            raise
        if len(rows) == 1:
            return [Outcome(error=_FIELD_PREFIX.sub("", _message(error)))]
        middle = len(rows) // 2
        return _bisect(rows[:middle], run, is_bad_input) + _bisect(rows[middle:], run, is_bad_input)


def _message(error: Exception) -> str:
    import grpc

    if isinstance(error, grpc.RpcError):
        return error.details() or str(error.code())
    return str(error)


def _outcomes(predictions) -> list[Outcome]:
    return [Outcome(p.label, p.score, np.asarray(p.probabilities, np.float32)) for p in predictions]


class LocalEngine:
    """The model repository loaded in this process; no server, no batching queue."""

    def __init__(self, models: Path, model: str, version: str = "", runtime=None):
        from serving.dataplane import DataPlane
        from serving.errors import ModelLoadError, ServingError
        from serving.repository import load_repository
        from serving.runtime import CPU_DEFAULTS

        if not (models / model).is_dir():
            have = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise ScoringError(f"model {model!r} not found in {models} (it has {', '.join(have) or 'nothing'})", 2)
        try:
            self.plane = DataPlane(load_repository(models, runtime or CPU_DEFAULTS, only={model}), batching=None)
            self.version = self.plane.model(model, version)
        except (ModelLoadError, ServingError) as error:
            raise ScoringError(str(error), 2) from None
        if self.version.card is None:
            raise ScoringError(f"model {model!r} is a plain tensor model; score takes text or audio models", 2)
        self.labels = self.version.card.labels
        self.audio = self.version.frontend is not None
        self.max_batch = self.plane.limits(self.version).max_batch_size

    def score(self, rows: list[Row]) -> list[Outcome]:
        from serving.errors import InvalidInput

        name, number = self.version.name, self.version.version

        def run(part: list[Row]) -> list[Outcome]:
            if self.audio:
                _, predictions = self.plane.classify_audio(name, number, [{"file": row.file} for row in part])
            else:
                _, predictions = self.plane.classify_texts(name, number, [row.text for row in part])
            return _outcomes(predictions)

        return _bisect(rows, run, lambda error: isinstance(error, InvalidInput))

    def close(self) -> None:
        self.plane.close()


RETRIED = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


class RemoteEngine:
    """A running server over gRPC: deadlines per call, retries with jittered exponential
    backoff on UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED."""

    def __init__(self, target: str, model: str, version: str = "", timeout_s: float = 60.0, retries: int = 5,
                 token: str | None = None, tls_ca: bytes | None = None, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None):
        import grpc

        from serving.grpc.client import RnnServeClient

        self.client = RnnServeClient(target, timeout_s=timeout_s, token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                     tls_key=tls_key)
        self.target, self.model, self.retries = target, model, retries
        try:
            info = self._retrying(lambda: self.client.get_model(model, version))
        except grpc.RpcError as error:
            raise ScoringError(f"{target}: {error.code().name}: {error.details()}", _exit_code(error)) from None
        if not info.labels:
            raise ScoringError(f"model {model!r} is a plain tensor model; score takes text or audio models", 2)
        self.version = info.version
        self.labels = list(info.labels)
        self.audio = info.task == "keyword_spotting"
        self.max_batch = info.limits.max_batch_size or 256

    def _retrying(self, call):
        import grpc

        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as error:
                if error.code().name not in RETRIED or attempt == self.retries:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def score(self, rows: list[Row]) -> list[Outcome]:
        import grpc

        def run(part: list[Row]) -> list[Outcome]:
            if self.audio:
                results = self._retrying(
                    lambda: self.client.classify_audio(self.model, [row.file for row in part], version=self.version)
                )
            else:
                results = self._retrying(
                    lambda: self.client.classify(self.model, [row.text for row in part], version=self.version)
                )
            return _outcomes(results)

        def bad_input(error: Exception) -> bool:
            return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT

        try:
            return _bisect(rows, run, bad_input)
        except grpc.RpcError as error:
            raise ScoringError(f"{self.target}: {error.code().name}: {error.details()}", _exit_code(error)) from None

    def close(self) -> None:
        self.client.close()


def _exit_code(error) -> int:
    """2 for what the user must fix (unknown model, bad token), 3 for a server that failed."""
    name = error.code().name
    return 2 if name in ("NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT") else 3
