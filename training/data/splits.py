"""Stratified train/validation/test splits with a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: list[int]
    validation: list[int]
    test: list[int]
    seed: int
    fractions: tuple[float, float, float]


def stratified_split(
    labels: list[int], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 13
) -> Split:
    """Split indices so every class keeps its share in each part (80/10/10 by default)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        rng.shuffle(members)
        n_train = int(round(len(members) * fractions[0]))
        n_validation = int(round(len(members) * fractions[1]))
        parts[0].extend(members[:n_train].tolist())
        parts[1].extend(members[n_train : n_train + n_validation].tolist())
        parts[2].extend(members[n_train + n_validation :].tolist())
    for part in parts:
        part.sort()
    return Split(train=parts[0], validation=parts[1], test=parts[2], seed=seed, fractions=fractions)


def predefined_split(parts: list[str]) -> Split:
    """The split a data set comes with ("train", "validation", "test" per example)."""
    unknown = sorted(set(parts) - {"train", "validation", "test"})
    if unknown:
        raise ValueError(f"unknown split parts {unknown}")
    indices = {name: [i for i, part in enumerate(parts) if part == name] for name in ("train", "validation", "test")}
    missing = [name for name, members in indices.items() if not members]
    if missing:
        raise ValueError(f"the predefined split has no {', '.join(missing)} examples")
    total = len(parts)
    return Split(
        train=indices["train"], validation=indices["validation"], test=indices["test"], seed=-1,
        fractions=tuple(round(len(indices[n]) / total, 4) for n in ("train", "validation", "test")),
    )
