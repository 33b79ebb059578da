"""`rnnserve score`'s job: read rows in batches, score them, write results in input order.

Memory stays flat: rows are read lazily, at most `concurrency + 1` batches are in flight,
and results are written as they complete. The output appears under its name only when the
whole input went through; a bad row stops the run naming file and row (or, with
`--on-error skip`, goes to the rejects file with the reason).
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.scoring.engines import Outcome, ScoringError
from serving.scoring.readers import InputError, Row, count_rows, input_format, read_rows
from serving.scoring.writers import RejectWriter, ResultWriter, output_format


@dataclass
class ScoreOptions:
    model: str
    input: str
    output: str
    models: Path = Path("models")
    version: str = ""
    server: str | None = None
    engine: str = "local"  # local (in-process or --server) | ray
    input_format: str | None = None
    output_format: str | None = None
    text_column: str = "text"
    id_column: str | None = None
    probabilities: bool = False
    batch_size: int = 256
    concurrency: int = 0  # 0: 1 in-process, 4 against a server, Ray: one actor per CPU but one
    timeout_s: float = 60.0
    retries: int = 5
    on_error: str = "stop"
    rejects: str | None = None
    token: str | None = None
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    ray_address: str | None = None
    device: str = "cpu"
    progress: bool | None = None  # None: when stderr is a terminal


class BadRow(Exception):
    pass


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _scored_in_order(engine, batches: Iterator[list[Row]], concurrency: int) -> Iterator[tuple[list[Row], list]]:
    """(rows, outcomes) per batch, in input order, with up to `concurrency` batches in flight.
    Rows the reader already refused skip the engine."""

    def score(rows: list[Row]) -> list[Outcome]:
        usable = [row for row in rows if row.error is None]
        scored = iter(engine.score(usable) if usable else [])
        return [Outcome(error=row.error) if row.error is not None else next(scored) for row in rows]

    if concurrency <= 1:
        for rows in batches:
            yield rows, score(rows)
        return
    with ThreadPoolExecutor(concurrency, thread_name_prefix="rnnserve-score") as pool:
        pending: deque = deque()
        for rows in batches:
            pending.append((rows, pool.submit(score, rows)))
            if len(pending) > concurrency:
                done_rows, future = pending.popleft()
                yield done_rows, future.result()
        while pending:
            done_rows, future = pending.popleft()
            yield done_rows, future.result()


def _engine(options: ScoreOptions):
    from serving.scoring.engines import LocalEngine, RemoteEngine

    if options.server:
        return RemoteEngine(options.server, options.model, options.version, options.timeout_s, options.retries,
                            options.token, options.tls_ca, options.tls_cert, options.tls_key)
    if not options.models.is_dir():
        raise InputError(f"--models {options.models}: no such folder")
    from serving.runtime import RuntimeOptions, resolve_providers

    try:
        providers = resolve_providers(options.device)
    except Exception as error:  # ModelLoadError with the reason
        raise ScoringError(str(error), 2) from None
    return LocalEngine(options.models, options.model, options.version, RuntimeOptions(providers))


@dataclass
class Summary:
    written: int
    rejected: int
    rejects_path: str | None


def run(options: ScoreOptions) -> Summary:
    """The whole job. Raises BadRow, InputError, OutputError, ScoringError or KeyboardInterrupt;
    serving/scoring/cli.py turns them into messages and exit codes."""
    kind = input_format(options.input, options.input_format)
    out_kind = output_format(options.output, options.output_format)
    if options.batch_size < 1:
        raise InputError("--batch-size: must be at least 1")
    if options.engine == "ray":
        from serving.scoring.ray_engine import RayRun

        source = RayRun(options, kind)
    else:
        source = None
    engine = source.local if source else _engine(options)
    if options.batch_size > engine.max_batch:
        raise InputError(f"--batch-size {options.batch_size}: the model takes at most {engine.max_batch} per request")
    total = count_rows(options.input, kind) if options.input != "-" else None
    writer = ResultWriter(options.output, out_kind, engine.labels, options.probabilities)
    rejects = None
    try:
        if options.on_error == "skip":
            rejects = RejectWriter(options.rejects or _rejects_path(options.output))
        if source:
            scored = source.scored(options.batch_size)
        else:
            rows = read_rows(options.input, kind, options.text_column, options.id_column)
            concurrency = options.concurrency or (4 if options.server else 1)
            scored = _scored_in_order(engine, _batches(rows, options.batch_size), concurrency)
        written = _write_all(scored, writer, rejects, total, options)
        writer.commit()
        if rejects is not None:
            rejects.commit()
    except BaseException:
        writer.abort()
        if rejects is not None:
            rejects.abort()
        raise
    finally:
        engine.close()
        if source:
            source.close()
    return Summary(written, rejects.count if rejects else 0, rejects.path if rejects else None)


def _rejects_path(output: str) -> str:
    return "rejects.jsonl" if output == "-" else f"{output}.rejects.jsonl"


def _write_all(scored, writer: ResultWriter, rejects: RejectWriter | None, total: int | None,
               options: ScoreOptions) -> int:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if options.progress is None else options.progress
    written = 0
    with tqdm(total=total, unit="rows", disable=not show, desc="scoring", smoothing=0.1, file=sys.stderr) as bar:
        for rows, outcomes in scored:
            ids, labels, scores, probabilities = [], [], [], []
            for row, outcome in zip(rows, outcomes, strict=True):
                if outcome.error is not None:
                    if rejects is None:
                        raise BadRow(f"{row.where}: {outcome.error}")
                    rejects.write(row.number, row.id, row.where, outcome.error)
                    continue
                ids.append(row.id)
                labels.append(outcome.label)
                scores.append(outcome.score)
                probabilities.append(outcome.probabilities)
            if ids:
                writer.write(ids, labels, np.asarray(scores, np.float32), np.stack(probabilities))
            written += len(ids)
            bar.update(len(rows))
    return written
