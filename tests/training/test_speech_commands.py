"""The Google Speech Commands folder layout, on a small tree of WAV files made here."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from training.data.files import DataFormatError
from training.data.speech import LABELS
from training.data.speech_commands import load_speech_commands


def _write(path, samples, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    for word in ("yes", "stop", "marvin"):
        for speaker in ("aa11", "bb22", "cc33"):
            _write(tmp_path / word / f"{speaker}_nohash_0.wav", rng.integers(-3000, 3000, 12000))
    _write(tmp_path / "_background_noise_" / "white.wav", rng.integers(-8000, 8000, 16000 * 30))
    (tmp_path / "validation_list.txt").write_text("yes/bb22_nohash_0.wav\nstop/bb22_nohash_0.wav\n")
    (tmp_path / "testing_list.txt").write_text("yes/cc33_nohash_0.wav\nmarvin/cc33_nohash_0.wav\n")
    return tmp_path


def test_lists_decide_the_split_and_other_words_are_unknown(tree):
    data = load_speech_commands(tree, silence_per_split={"train": 4, "validation": 2, "test": 2})
    by_source = dict(zip(data.sources, zip(data.parts, data.labels, strict=True), strict=True))
    assert by_source["yes/cc33_nohash_0.wav"] == ("test", LABELS.index("yes"))
    assert by_source["stop/bb22_nohash_0.wav"] == ("validation", LABELS.index("stop"))
    assert by_source["marvin/aa11_nohash_0.wav"] == ("train", LABELS.index("_unknown_"))
    assert data.clips.shape == (9 + 8, 16000) and data.clips.dtype == np.int16
    assert not data.clips[0, 12000:].any()  # short clips are zero-padded to 1 s
    silence = [p for p, label in zip(data.parts, data.labels, strict=True) if label == LABELS.index("_silence_")]
    assert sorted(silence) == ["test"] * 2 + ["train"] * 4 + ["validation"] * 2


def test_missing_list_and_wrong_rate_are_explained(tree):
    (tree / "testing_list.txt").unlink()
    with pytest.raises(DataFormatError, match="testing_list.txt: missing"):
        load_speech_commands(tree)
    (tree / "testing_list.txt").write_text("")
    _write(tree / "yes" / "dd44_nohash_0.wav", np.zeros(8000), rate=8000)
    with pytest.raises(DataFormatError, match="sample rate 8000 Hz, expected 16000"):
        load_speech_commands(tree)
