"""Inputs of `rnnserve score`, read lazily row by row: memory does not grow with the file.

Each row carries its position (`where`, e.g. `reviews.csv:17`) so a bad one can be named.
A row the reader cannot use (invalid UTF-8, broken JSON, a missing field) comes out with
`error` set instead of a payload; the caller decides whether that stops the run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet", "audio")


class InputError(Exception):
    """The input as a whole cannot be read (missing file, missing column, unknown format)."""


@dataclass
class Row:
    number: int  # 1-based data row (line for txt/jsonl, record after the header for csv)
    id: str
    where: str
    text: str | None = None
    file: bytes | None = None  # an encoded audio file
    error: str | None = None


def input_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    if path == "-":
        return "txt"
    if any(ch in path for ch in "*?[") or Path(path).is_dir():
        return "audio"
    suffix = Path(path).suffix.lower()
    by_suffix = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".parquet": "parquet", ".pq": "parquet"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    raise InputError(f"{path}: cannot tell the format from the name; pass --input-format ({', '.join(FORMATS)})")


def _binary(path: str):
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as error:
        raise InputError(f"{path}: {error.strerror}") from None


def count_rows(path: str, kind: str, text_column: str | None = None) -> int | None:
    """Rows in the input when cheap to know (for the progress bar's ETA), else None."""
    if path == "-":
        return None
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) for non-Parquet
            raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    if kind == "audio":
        return len(audio_files(path))
    lines, last = 0, b"\n"
    with _binary(path) as handle:  # a missing file is the user's mistake: InputError, not a traceback
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return max(lines - (kind in ("csv", "tsv")), 0)


def read_rows(path: str, kind: str, text_column: str = "text", id_column: str | None = None) -> Iterator[Row]:
    readers = {"txt": _text_lines, "csv": _delimited, "tsv": _delimited, "jsonl": _json_lines,
               "parquet": _parquet, "audio": _audio}
    if kind not in readers:
        raise InputError(f"--input-format {kind}: not one of {', '.join(FORMATS)}")
    if kind == "audio" and path == "-":
        raise InputError("audio cannot come from stdin: give a folder or a glob of WAV/FLAC/OGG files")
    if kind == "parquet" and path == "-":
        raise InputError("Parquet cannot come from stdin: give a file")
    return readers[kind](path, kind, text_column, id_column)


def _name(path: str) -> str:
    return "stdin" if path == "-" else path


def _text_lines(path: str, kind: str, text_column: str, id_column: str | None) -> Iterator[Row]:
    handle = _binary(path)
    try:
        for number, raw in enumerate(handle, start=1):
            where = f"{_name(path)}:{number}"
            line = raw.rstrip(b"\r\n")
            try:
                yield Row(number, str(number), where, text=line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield Row(number, str(number), where, error=f"not valid UTF-8 ({error.reason} at byte {error.start})")
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _delimited(path: str, kind: str, text_column: str, id_column: str | None) -> Iterator[Row]:
    handle = _binary(path)
    # surrogateescape keeps undecodable bytes visible per field instead of failing the file
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
    try:
        reader = csv.reader(text, delimiter="\t" if kind == "tsv" else ",")
        header = next(reader, None)
        if header is None:
            raise InputError(f"{_name(path)}: empty file, no header row")
        columns = {name: index for index, name in enumerate(header)}
        for wanted, option in ((text_column, "--text-column"), (id_column, "--id-column")):
            if wanted is not None and wanted not in columns:
                raise InputError(f"{_name(path)}: no column {wanted!r} ({option}); the header has {header}")
        text_at = columns[text_column]
        id_at = columns[id_column] if id_column else None
        for number, record in enumerate(reader, start=1):
            where = f"{_name(path)}:{reader.line_num}"
            if not record:  # a blank line
                yield Row(number, str(number), where, error="blank line")
                continue
            if text_at >= len(record) or (id_at is not None and id_at >= len(record)):
                yield Row(number, str(number), where,
                          error=f"{len(record)} fields, the header has {len(header)} (missing column)")
                continue
            value, row_id = record[text_at], record[id_at] if id_at is not None else str(number)
            if _has_surrogates(value) or _has_surrogates(row_id):
                yield Row(number, str(number), where, error="not valid UTF-8")
                continue
            yield Row(number, row_id, where, text=value)
    finally:
        text.detach()
        if handle is not sys.stdin.buffer:
            handle.close()


def _json_lines(path: str, kind: str, text_column: str, id_column: str | None) -> Iterator[Row]:
    for line in _text_lines(path, kind, text_column, id_column):
        if line.error:
            yield line
            continue
        number, where = line.number, line.where
        try:
            record = json.loads(line.text)
        except json.JSONDecodeError as error:
            yield Row(number, str(number), where, error=f"not valid JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            yield Row(number, str(number), where, error="not a JSON object")
            continue
        value = record.get(text_column)
        if not isinstance(value, str):
            problem = "missing" if text_column not in record else f"a {type(value).__name__}, not a string"
            yield Row(number, str(number), where, error=f"field {text_column!r} is {problem}")
            continue
        row_id = str(number)
        if id_column is not None:
            if id_column not in record:
                yield Row(number, str(number), where, error=f"field {id_column!r} is missing")
                continue
            row_id = str(record[id_column])
        yield Row(number, row_id, where, text=value)


def _parquet(path: str, kind: str, text_column: str, id_column: str | None) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'rnnserve[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) for non-Parquet
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    names = parquet.schema_arrow.names
    for wanted, option in ((text_column, "--text-column"), (id_column, "--id-column")):
        if wanted is not None and wanted not in names:
            raise InputError(f"{path}: no column {wanted!r} ({option}); the file has {names}")
    columns = [text_column] + ([id_column] if id_column else [])
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        texts = batch.column(text_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column else None
        for offset, value in enumerate(texts):
            number += 1
            where = f"{path}:row {number}"
            row_id = str(ids[offset]) if ids is not None else str(number)
            if not isinstance(value, str):
                kind_of = "null" if value is None else type(value).__name__
                yield Row(number, row_id, where, error=f"column {text_column!r} is {kind_of}")
                continue
            yield Row(number, row_id, where, text=value)


def audio_files(path: str) -> list[Path]:
    root = Path(path)
    if root.is_dir():
        files = [p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file()]
    if not files:
        raise InputError(f"{path}: no WAV, FLAC or OGG files there")
    return sorted(files)


def _audio(path: str, kind: str, text_column: str, id_column: str | None) -> Iterator[Row]:
    root = Path(path) if Path(path).is_dir() else None
    for number, file in enumerate(audio_files(path), start=1):
        row_id = str(file.relative_to(root)) if root else str(file)
        try:
            yield Row(number, row_id, str(file), file=file.read_bytes())
        except OSError as error:
            yield Row(number, row_id, str(file), error=f"cannot read: {error.strerror}")
