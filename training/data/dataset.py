"""Labelled text examples and labelled audio clips, each with a content digest: what loaders return."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str
    # A predefined split ("train", "validation" or "test" per example), when the data comes
    # with one; otherwise training makes a stratified split.
    parts: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.parts is not None and len(self.parts) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.parts)} split parts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            source=self.source,
            parts=[self.parts[i] for i in indices] if self.parts is not None else None,
        )

    def digest(self) -> str:
        """sha256 over labels and texts in order: identifies exactly the data a model saw."""
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(f"{label}\t{text}\n".encode())
        return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class AudioClips:
    """Labelled 1 s clips: int16 samples [N, 16000], label ids, split part and source per clip.

    Parts are "train", "validation", "test" (unseen speakers where the data knows speakers) and,
    for generated data, "test_seen" (held-out clips of training speakers).
    """

    clips: np.ndarray
    labels: list[int]
    parts: list[str]
    sources: list[str]
    label_names: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if not len(self.clips) == len(self.labels) == len(self.parts) == len(self.sources):
            raise ValueError("clips, labels, parts and sources differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """sha256 over labels, parts and samples in order."""
        h = hashlib.sha256()
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        h.update("\n".join(self.parts).encode())
        h.update(np.ascontiguousarray(self.clips).tobytes())
        return "sha256:" + h.hexdigest()
