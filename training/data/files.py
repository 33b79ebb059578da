"""Users' own labelled text: CSV/TSV and JSONL files, and the IMDB `aclImdb` folder layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from training.data.dataset import TextDataset


class DataFormatError(ValueError):
    """The file does not have the expected layout; the message names the file and row."""


def _labelled(path: Path, rows: list[tuple[str, str]], label_names: list[str] | None) -> TextDataset:
    if not rows:
        raise DataFormatError(f"{path}: no labelled rows")
    names = label_names or sorted({label for _, label in rows})
    if len(names) < 2:
        raise DataFormatError(f"{path}: needs at least 2 distinct labels, found {names}")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in rows} - set(index))
    if unknown:
        raise DataFormatError(f"{path}: labels {unknown} are not among {names}")
    return TextDataset(
        texts=[text for text, _ in rows], labels=[index[label] for _, label in rows],
        label_names=names, source=f"file:{path.name}",
    )


def load_table(
    path: Path, text_column: str = "text", label_column: str = "label", label_names: list[str] | None = None
) -> TextDataset:
    """CSV (.csv), TSV (.tsv) or JSON Lines (.jsonl/.ndjson); empty texts are skipped."""
    suffix = path.suffix.lower()
    rows: list[tuple[str, str]] = []
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataFormatError(f"{path}:{number}: not valid JSON: {error.msg}") from None
                rows.append(_row(path, number, record, text_column, label_column))
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for number, record in enumerate(reader, start=2):
                rows.append(_row(path, number, record, text_column, label_column))
    else:
        raise DataFormatError(f"{path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or an aclImdb folder")
    return _labelled(path, [(text, label) for text, label in rows if text.strip()], label_names)


def _row(path: Path, number: int, record, text_column: str, label_column: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}:{number}: expected an object with {text_column!r} and {label_column!r}")
    for column in (text_column, label_column):
        if record.get(column) is None:
            raise DataFormatError(f"{path}:{number}: missing column {column!r}")
    return str(record[text_column]), str(record[label_column])


def load_aclimdb(root: Path, validation_fraction: float = 0.1, seed: int = 13) -> TextDataset:
    """The IMDB reviews layout `{train,test}/{neg,pos}/*.txt`, keeping its own train/test split.

    A stratified `validation_fraction` of the training reviews becomes the validation split.
    """
    texts: list[str] = []
    labels: list[int] = []
    parts: list[str] = []
    names = ["neg", "pos"]
    for part in ("train", "test"):
        for label, name in enumerate(names):
            folder = root / part / name
            files = sorted(folder.glob("*.txt"))
            if not files:
                raise DataFormatError(f"{folder}: no reviews (expected {root}/{{train,test}}/{{neg,pos}}/*.txt)")
            for path in files:
                texts.append(path.read_text(encoding="utf-8").replace("<br />", " "))
                labels.append(label)
                parts.append(part)
    rng = np.random.default_rng(seed)
    for label in (0, 1):
        members = [i for i, (p, lab) in enumerate(zip(parts, labels, strict=True)) if p == "train" and lab == label]
        for i in rng.permutation(members)[: int(round(len(members) * validation_fraction))]:
            parts[i] = "validation"
    return TextDataset(texts=texts, labels=labels, label_names=names, source=f"aclImdb:{root.name}", parts=parts)
