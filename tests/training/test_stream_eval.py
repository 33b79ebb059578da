"""The continuous-speech keyword evaluation: MLPerf Tiny matching and debouncing on posteriors
with known answers, the operating point choice, and a real run of the bundled model through the
server's streaming code on the quick recordings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.streaming import DetectorConfig
from training.data.streams import Recording
from training.stream_eval import choose, debounced, judged, score

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["yes", "no", "_silence_", "_unknown_"]
HOP_MS, WINDOW_MS = 20.0, 30.0
CONFIG = DetectorConfig(threshold=0.5, smoothing_ms=20, decision_ms=100)


def _posteriors(seconds: float, words: list[tuple[int, float]]) -> np.ndarray:
    """Silence everywhere, and 200 ms of label `label` from `start_s` on."""
    frames = np.tile(np.array([0.0, 0.0, 1.0, 0.0], np.float32), (int(seconds * 50), 1))
    for label, start_s in words:
        first = int(start_s * 50)
        frames[first : first + 10] = np.eye(4, dtype=np.float32)[label]
    return frames


def test_hits_are_reported_between_start_and_half_a_second_after_the_end():
    recording = Recording(np.zeros(10 * 16000, np.float32),
                          [("yes", 1.0, 1.5), ("no", 3.0, 3.4), ("yes", 6.0, 6.4)], [])
    # "yes" fires at once after its end: reported 100 ms later, a hit. "no" is answered with
    # "yes": a false alarm and a miss. The second "yes" is reported 1.0 s after its end: too late.
    posteriors = _posteriors(10, [(0, 1.5), (0, 3.4), (0, 7.3)])
    result = score([recording], [posteriors], LABELS, HOP_MS, WINDOW_MS, CONFIG)
    assert (result["hits"], result["keywords"], result["false_alarms"]) == (1, 3, 2)
    assert result["recall_per_keyword"] == {"yes": 0.5, "no": 0.0}
    assert result["top_false_alarms"] == {"no->yes": 1, "none->yes": 1}


def test_false_alarms_are_debounced_to_one_a_second():
    assert debounced([0.0, 0.3, 0.9, 1.0, 1.5, 5.0]) == 3
    recording = Recording(np.zeros(20 * 16000, np.float32), [], [])
    # Four detections 0.6 s apart (refractory 0), then one far away.
    posteriors = _posteriors(20, [(0, 2.0), (1, 2.6), (0, 3.2), (1, 3.8), (0, 12.0)])
    quick = DetectorConfig(threshold=0.5, smoothing_ms=20, decision_ms=100, refractory_ms=0)
    result = score([recording], [posteriors], LABELS, HOP_MS, WINDOW_MS, quick)
    assert result["false_alarms"] == 3  # 2.0 (2.6 within a second), 3.2 (3.8 within a second), 12.0
    assert result["false_alarms_per_hour"] == pytest.approx(3 / (20 / 3600))


def test_recall_comes_from_keyword_recordings_and_false_alarms_from_continuous_speech():
    keyword_recording = Recording(np.zeros(5 * 16000, np.float32), [("no", 1.0, 1.4)], [(1.0, 1.4)])
    speech = Recording(np.zeros(3600 * 16000 // 60, np.float32), [], [(0.0, 60.0)])  # one minute
    result = judged([speech], [keyword_recording], [_posteriors(60, [(0, 30.0)])], [_posteriors(5, [(1, 1.4)])],
                    LABELS, HOP_MS, WINDOW_MS, CONFIG)
    assert result["recall"] == 1.0 and result["false_alarms"] == 1
    assert result["false_alarms_per_hour"] == pytest.approx(60.0)


def test_the_operating_point_is_the_most_recall_within_the_budget():
    def point(threshold, recall, per_hour):
        return DetectorConfig(threshold=threshold), {"recall": recall, "false_alarms_per_hour": per_hour}

    results = [point(0.5, 0.95, 8.0), point(0.8, 0.90, 1.5), point(0.9, 0.90, 0.5), point(0.99, 0.6, 0.0)]
    assert choose(results)[0].threshold == 0.9  # equal recall: fewer false alarms
    assert choose(results, budget=10.0)[0].threshold == 0.5
    assert choose([point(0.5, 0.9, 30.0), point(0.9, 0.5, 12.0)])[0].threshold == 0.9  # none fits: the quietest


def test_the_bundled_keyword_model_on_quick_recordings(tmp_path):
    from training.data.streams import QUICK_STREAM_DATA, build_banks
    from training.stream_eval import evaluate
    from training.tasks import cache_dir

    versions = sorted((ROOT / "models" / "keywords").iterdir(), key=lambda p: int(p.name))
    banks = build_banks(cache_dir() / "streams", QUICK_STREAM_DATA)
    result = evaluate(versions[-1], banks, tmp_path / "det.png", progress=lambda message: None)
    (point,) = result["operating_points"]
    assert point["false_alarm_budget_per_hour"] == 2.0
    for split in ("validation", "test", "held_out_engine"):
        assert 0.0 <= point[split]["recall"] <= 1.0 and point[split]["speech_hours"] > 0
        assert set(point[split]["recall_per_keyword"]) <= set(LABELS + ["up", "down", "left", "right", "on",
                                                                       "off", "stop", "go"])
    curve = result["det_curves"]["test"]
    thresholds = [p["threshold"] for p in curve]
    assert thresholds == sorted(thresholds)
    assert curve[0]["recall"] >= curve[-1]["recall"]
    assert curve[0]["false_alarms_per_hour"] >= curve[-1]["false_alarms_per_hour"]
    assert (tmp_path / "det.png").read_bytes().startswith(b"\x89PNG")
