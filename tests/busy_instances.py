"""Every instance of a served model kept busy with a real job, for tests of what waits in the
queue meanwhile (deadlines passing there)."""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def busy_instances(plane, model_name: str, hold_s: float = 30.0):
    """Inside the block every instance of the model runs a real job whose post-processing (on the
    instance thread) waits until the block ends; new requests wait in the queue."""
    model = plane.model(model_name)
    batcher = plane.batcher(model)
    release, busy = threading.Event(), threading.Semaphore(0)

    def hold(result):
        busy.release()
        release.wait(hold_s)
        return result

    _, rows, _ = plane._text_job(model_name, "", ["an instance stays busy"], 0)
    holders = []
    for _ in range(batcher.instances):  # one at a time, or one instance would take them all in one call
        holders.append(batcher.submit(("text", rows), len(rows), key="text", then=hold))
        if not busy.acquire(timeout=hold_s):
            release.set()
            raise TimeoutError("an instance did not start its job")
    try:
        yield batcher
    finally:
        release.set()
        for holder in holders:
            holder.result(hold_s)
