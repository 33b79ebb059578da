"""Outputs of `rnnserve score`: JSONL, CSV or Parquet, written to a temporary file beside the
target and renamed into place only when the run succeeds; a failed run leaves nothing."""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

OUTPUT_FORMATS = ("jsonl", "csv", "parquet")


class OutputError(Exception):
    pass


def output_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
                 ".pq": "parquet"}
    if suffix not in by_suffix:
        raise OutputError(f"{path}: cannot tell the format from the name; pass --format ({', '.join(OUTPUT_FORMATS)})")
    return by_suffix[suffix]


class AtomicFile:
    """A temporary file in the target's folder; commit() renames it over the target."""

    def __init__(self, path: str, binary: bool):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise OutputError(f"{path}: the folder {self.path.parent} does not exist")
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial",
                                                 dir=self.path.parent)
        self.temporary = Path(temporary)
        self.handle = os.fdopen(descriptor, "wb" if binary else "w", **({} if binary else {"newline": ""}))

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.temporary, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.temporary.unlink(missing_ok=True)


class ResultWriter:
    """Rows of id, label, score and, with probabilities, one column per label."""

    def __init__(self, path: str, kind: str, labels: list[str], probabilities: bool):
        self.kind, self.labels, self.probabilities = kind, labels, probabilities
        self.target = None if path == "-" else AtomicFile(path, binary=kind == "parquet")
        if kind == "parquet" and path == "-":
            raise OutputError("Parquet cannot go to stdout: give a file name")
        self.handle = sys.stdout if path == "-" else self.target.handle
        self._csv = None
        self._parquet = None
        if kind == "csv":
            self._csv = csv.writer(self.handle)
            self._csv.writerow(["id", "label", "score", *([f"p_{label}" for label in labels] if probabilities else [])])
        elif kind == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise OutputError("Parquet needs pyarrow: pip install 'rnnserve[parquet]'") from None
            fields = [pa.field("id", pa.string()), pa.field("label", pa.string()), pa.field("score", pa.float32())]
            fields += [pa.field(f"p_{label}", pa.float32()) for label in labels] if probabilities else []
            self._schema = pa.schema(fields)
            self._parquet = pq.ParquetWriter(self.handle, self._schema)

    def write(self, ids: list[str], labels: list[str], scores: np.ndarray, probabilities: np.ndarray) -> None:
        if not ids:
            return
        if self.kind == "jsonl":
            lines = []
            for index, row_id in enumerate(ids):
                record = {"id": row_id, "label": labels[index], "score": round(float(scores[index]), 6)}
                if self.probabilities:
                    record["probabilities"] = {
                        label: round(float(p), 6) for label, p in zip(self.labels, probabilities[index], strict=True)
                    }
                lines.append(json.dumps(record, ensure_ascii=False))
            self.handle.write("\n".join(lines) + "\n")
        elif self.kind == "csv":
            for index, row_id in enumerate(ids):
                extra = [f"{p:.6f}" for p in probabilities[index]] if self.probabilities else []
                self._csv.writerow([row_id, labels[index], f"{scores[index]:.6f}", *extra])
        else:
            import pyarrow as pa

            columns = {"id": ids, "label": labels, "score": np.asarray(scores, np.float32)}
            if self.probabilities:
                for column, label in enumerate(self.labels):
                    columns[f"p_{label}"] = np.asarray(probabilities[:, column], np.float32)
            self._parquet.write_table(pa.table(columns, schema=self._schema))

    def commit(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self.target is not None:
            self.target.commit()
        else:
            self.handle.flush()

    def abort(self) -> None:
        if self._parquet is not None:
            try:
                self._parquet.close()
            except Exception:  # the file is discarded anyway
                pass
        if self.target is not None:
            self.target.abort()


class RejectWriter:
    """`--on-error skip`: one JSON line per rejected row (row, id, where, error), atomically."""

    def __init__(self, path: str):
        self.path = path
        self.target = AtomicFile(path, binary=False)
        self.count = 0

    def write(self, number: int, row_id: str, where: str, error: str) -> None:
        self.count += 1
        record = {"row": number, "id": row_id, "where": where, "error": error}
        self.target.handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.target.commit()

    def abort(self) -> None:
        self.target.abort()
