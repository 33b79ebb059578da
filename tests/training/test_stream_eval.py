"""The long-recording keyword evaluation: its scoring on posteriors with known answers, and a
real run of the bundled model over the quick synthesised data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.streaming import DetectorConfig
from training.stream_eval import build_recordings, evaluate, score

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["yes", "no", "_silence_", "_unknown_"]


def test_recordings_hold_every_clip_once_at_the_stated_times():
    clips = (np.arange(6)[:, None] * np.ones((6, 16000)) + 1).astype(np.int16)  # clip i is the constant i+1
    labels = ["yes", "_silence_", "no", "_unknown_", "yes", "no"]
    recordings = build_recordings(clips, labels, count=2, seed=0)
    keywords = [k for r in recordings for k in r.keywords]
    assert sorted(k[0] for k in keywords) == ["no", "no", "yes", "yes"]
    for recording in recordings:
        for label, start, end in recording.keywords:
            assert end - start == pytest.approx(1.0)
            segment = recording.samples[round(start * 16000) : round(end * 16000)] * 32768
            value = int(round(segment[0]))
            assert np.all(np.round(segment) == value) and labels[value - 1] == label


def test_scoring_counts_hits_misses_and_false_alarms():
    from training.stream_eval import Recording

    frames = 250  # 5 s at 20 ms
    recording = Recording(np.zeros(frames * 320, np.float32), [("yes", 1.0, 2.0), ("no", 3.0, 4.0)])
    posteriors = np.tile(np.array([0.0, 0.0, 1.0, 0.0]), (frames, 1))

    def word(label: int, start_s: float) -> None:
        first = int(start_s * 50)
        posteriors[first : first + 10] = np.eye(4)[label]

    word(0, 1.3)  # "yes" inside its clip: a hit
    word(0, 3.3)  # "yes" where "no" was said: a false alarm, and "no" is missed
    word(1, 0.1)  # "no" where nothing was said: a false alarm
    result = score([recording], [posteriors], LABELS, 20, 30, DetectorConfig(threshold=0.5, smoothing_ms=20))
    assert (result["hits"], result["keywords"], result["false_alarms"]) == (1, 2, 2)
    assert result["recall"] == 0.5
    assert result["top_false_alarms"] == {"no->yes": 1, "none->no": 1}


def test_the_bundled_keyword_model_on_quick_data():
    from training.tasks import TASKS

    result = evaluate(ROOT / "models" / "keywords" / "1", TASKS["keywords"].load(quick=True), recordings_per_split=4)
    points = result["operating_points"]
    budgets = [p["false_alarm_budget_per_hour"] for p in points]
    assert budgets == sorted(budgets)
    for point in points:
        assert point["validation"]["false_alarms_per_hour"] <= point["false_alarm_budget_per_hour"]
        assert 0.0 <= point["test"]["recall"] <= 1.0 and point["test"]["hours"] > 0
    # A generous budget finds most keywords of unseen speakers.
    assert points[-1]["test"]["recall"] > 0.6
