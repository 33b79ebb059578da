"""In-process ceilings: the most rows per second a model does on this machine with no server,
best of sessions x intra-op threads x batch, every session driven by its own thread at once.

The LSTM is its ONNX file alone in ONNX Runtime; the text model is the data plane's own
classify (tokenisation, padding, ONNX Runtime, softmax) on a batch of one text repeated, so its
ceiling includes the tokenisation a request pays for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def layouts(cores: int) -> list[tuple[int, int]]:
    """(sessions, threads each) that fill the cores: one session with them all, one per core."""
    return sorted({(1, cores), (cores, 1)})


def concurrent_rows_per_s(batch_calls: list[Callable[[], None]], rows: int, seconds: float) -> float:
    """Each call runs one batch of `rows` rows; every call loops on its own thread for `seconds`,
    all at once (ONNX Runtime releases the GIL while it runs). Rows finished / wall time."""
    for call in batch_calls:  # warm: first-run allocations are no part of the ceiling
        call()
    done = [0] * len(batch_calls)
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            batch_calls[index]()
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(index,)) for index in range(len(batch_calls))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) * rows / (time.perf_counter() - started)


def lstm(model: Path, sessions: int, threads: int, batch: int, seconds: float) -> float:
    """Rows/s of the peer LSTM (`ids` INT64 [batch, 64]) in `sessions` ONNX Runtime sessions."""
    import onnxruntime

    ids = np.random.default_rng(1).integers(0, 20_000, size=(batch, 64), dtype=np.int64)
    calls = []
    for _ in range(sessions):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        calls.append(lambda session=session: session.run(None, {"ids": ids}))
    return concurrent_rows_per_s(calls, batch, seconds)


def text_model(models: Path, name: str, text: str, sessions: int, threads: int, batch: int, seconds: float) -> float:
    """Rows/s of the text model `name` through the data plane's classify, tokenisation included,
    one data plane (one session of `threads` threads) per session."""
    from serving.dataplane import DataPlane
    from serving.repository import load_repository
    from serving.runtime import RuntimeOptions

    planes = [DataPlane(load_repository(models, RuntimeOptions(intra_op_threads=threads), only={name}),
                        batching=None) for _ in range(sessions)]
    texts = [text] * batch
    try:
        return concurrent_rows_per_s([lambda plane=plane: plane.classify_texts(name, "", texts) for plane in planes],
                                     batch, seconds)
    finally:
        for plane in planes:
            plane.close()


def grid(measure: Callable[[int, int, int], float], cores: int, batches: tuple[int, ...]) -> dict[str, float]:
    """measure(sessions, threads, batch) for every layout and batch: {label: rows/s}."""
    return {f"{sessions} session(s) x {threads} thread(s), batch {batch}": measure(sessions, threads, batch)
            for sessions, threads in layouts(cores) for batch in batches}
