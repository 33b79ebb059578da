"""The Google Speech Commands folder layout, for users who bring the real recordings.

`<root>/<word>/<speaker>_nohash_<n>.wav` clips, with `validation_list.txt` and
`testing_list.txt` naming the held-out clips (paths relative to root) and
`_background_noise_/*.wav` long noise recordings. Words outside the ten keywords
become `_unknown_`; `_silence_` clips are cut from the background noise and take
the split of their position in each recording (first 80% train, then 10/10).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from training.data.dataset import AudioClips
from training.data.files import DataFormatError
from training.data.speech import CLIP_SAMPLES, KEYWORDS, LABELS, SAMPLE_RATE_HZ, SILENCE, UNKNOWN

BACKGROUND = "_background_noise_"


def read_wav(path: Path) -> np.ndarray:
    """16-bit mono PCM at 16 kHz as int16 samples (the Speech Commands format)."""
    try:
        with wave.open(str(path), "rb") as handle:
            if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
                raise DataFormatError(f"{path}: expected 16-bit mono PCM")
            if handle.getframerate() != SAMPLE_RATE_HZ:
                raise DataFormatError(f"{path}: sample rate {handle.getframerate()} Hz, expected {SAMPLE_RATE_HZ}")
            return np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    except (wave.Error, EOFError) as error:
        raise DataFormatError(f"{path}: not a readable WAV file: {error}") from None


def _fit(samples: np.ndarray) -> np.ndarray:
    clip = np.zeros(CLIP_SAMPLES, np.int16)
    clip[: min(len(samples), CLIP_SAMPLES)] = samples[:CLIP_SAMPLES]
    return clip


def _listed(root: Path, name: str) -> set[str]:
    path = root / name
    if not path.is_file():
        raise DataFormatError(f"{path}: missing (the Speech Commands layout lists held-out clips there)")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load_speech_commands(root: Path, silence_per_split: dict[str, int] | None = None, seed: int = 13) -> AudioClips:
    validation, testing = _listed(root, "validation_list.txt"), _listed(root, "testing_list.txt")
    clips, labels, parts, sources = [], [], [], []
    word_folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name != BACKGROUND)
    if not word_folders:
        raise DataFormatError(f"{root}: no word folders")
    for folder in word_folders:
        label = LABELS.index(folder.name if folder.name in KEYWORDS else UNKNOWN)
        for path in sorted(folder.glob("*.wav")):
            relative = f"{folder.name}/{path.name}"
            clips.append(_fit(read_wav(path)))
            labels.append(label)
            parts.append("test" if relative in testing else "validation" if relative in validation else "train")
            sources.append(relative)
    counts = silence_per_split or {"train": 400, "validation": 50, "test": 50}
    noises = sorted((root / BACKGROUND).glob("*.wav")) if (root / BACKGROUND).is_dir() else []
    rng = np.random.default_rng(seed)
    for part, count in counts.items():
        for index in range(count if noises else 0):
            path = noises[index % len(noises)]
            noise = read_wav(path)
            start_fraction, end_fraction = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}[part]
            low = int(len(noise) * start_fraction)
            high = max(low, int(len(noise) * end_fraction) - CLIP_SAMPLES)
            offset = int(rng.integers(low, high + 1))
            gain = float(rng.uniform(0.0, 1.0))
            clips.append(_fit((noise[offset : offset + CLIP_SAMPLES] * gain).astype(np.int16)))
            labels.append(LABELS.index(SILENCE))
            parts.append(part)
            sources.append(f"{BACKGROUND}/{path.name}@{offset}")
    return AudioClips(np.stack(clips), labels, parts, sources, list(LABELS), source=f"Speech Commands folder {root}")
