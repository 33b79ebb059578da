"""The continuous-speech keyword evaluation: MLPerf Tiny matching and debouncing on posteriors
with known answers, equality with the frame-by-frame evaluation it replaced on random ones, the
operating point choice, and a real run of the bundled model through the server's streaming code
on the quick recordings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from detector_reference import reference_detect

from serving.streaming import DetectorConfig
from training.data.streams import Recording
from training.stream_eval import (
    HIT_AFTER_END_S,
    Judge,
    choose,
    choose_operating_point,
    debounced,
    detect_all,
    grid,
    judged,
    judged_grid,
    score,
    tune_keyword_thresholds,
)

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
                          [("yes", 1.0, 1.5), ("no", 3.0, 3.4), ("yes", 6.0, 6.4)], [], [False, True, True])
    # "yes" fires at once after its end: reported 100 ms later, a hit. "no" is answered with
    # "yes": a false alarm and a miss. The second "yes" is reported 1.0 s after its end: too late.
    posteriors = _posteriors(10, [(0, 1.5), (0, 3.4), (0, 7.3)])
    result = score([recording], [posteriors], LABELS, HOP_MS, WINDOW_MS, CONFIG)
    assert (result["hits"], result["keywords"], result["false_alarms"]) == (1, 3, 2)
    assert result["recall_per_keyword"] == {"yes": 0.5, "no": 0.0}
    assert result["recall_by_delivery"] == {"command": 1.0, "in_sentence": 0.0}
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


def _reference_score(recordings, posteriors, labels, hop_ms, window_ms, config) -> tuple:
    """What score() counted as it was: the frame-by-frame detector on each recording, each event
    matched in turn. Returns (times each keyword was said, hits per keyword, debounced false
    alarms, the false alarm kinds with their counts, most first)."""
    keywords = [label for label in labels if not label.startswith("_")]
    said, found = dict.fromkeys(keywords, 0), dict.fromkeys(keywords, 0)
    false_alarms, confusions = 0, {}
    for recording, frames in zip(recordings, posteriors, strict=True):
        matched, alarms = set(), []
        for label, _, _ in recording.keywords:
            said[label] += 1
        for event in reference_detect(frames, labels, hop_ms, window_ms, config):
            moment = event.reported_ms / 1000
            hit, overlapped = None, None
            for index, (label, start, end) in enumerate(recording.keywords):
                if start <= moment <= end + HIT_AFTER_END_S and index not in matched:
                    overlapped = label
                    if label == event.keyword:
                        hit = index
                        break
            if hit is not None:
                matched.add(hit)
                found[event.keyword] += 1
            else:
                alarms.append(moment)
                key = f"{overlapped or 'none'}->{event.keyword}"
                confusions[key] = confusions.get(key, 0) + 1
        false_alarms += debounced(alarms)
    return said, found, false_alarms, sorted(confusions.items(), key=lambda kv: -kv[1])[:8]


def _random_recordings(rng: np.random.Generator, count: int, with_keywords: bool):
    """Recordings of 20-40 s and their posteriors: keywords about every 1-3 s (hit windows that
    sometimes overlap) answered by bursts that name them, name the other one, come late or come
    twice; in speech without keywords, bumps of every height."""
    recordings, posteriors = [], []
    for _ in range(count):
        frames = int(rng.integers(1000, 2000))
        logits = rng.normal(0, 1, (frames, len(LABELS)))
        logits[:, 3] += 2.5
        said = []
        if with_keywords:
            moment = rng.uniform(0.5, 1.5)
            while moment < frames / 50 - 3:
                label, length = int(rng.integers(0, 2)), rng.uniform(0.3, 0.6)
                said.append((LABELS[label], moment, moment + length))
                kind = rng.choice(["named", "named", "named", "other", "late", "twice"])
                named = 1 - label if kind == "other" else label
                ends = {"late": [0.8], "twice": [-0.2, 0.3]}.get(kind, [-0.2])  # bursts, from the keyword's end
                for at in (moment + length + after for after in ends):
                    logits[int(at * 50) : int(at * 50) + int(rng.integers(5, 20)), named] += rng.uniform(3, 8)
                moment += length + rng.uniform(0.3, 2.5)
        for at in rng.integers(0, frames, frames // 100):
            logits[at : at + int(rng.integers(3, 20)), rng.integers(0, 2)] += rng.uniform(1, 7)
        recordings.append(Recording(np.zeros(frames * 320 + 160, np.float32), said, []))
        posteriors.append((np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32))
    return recordings, posteriors


def test_the_grid_equals_the_frame_by_frame_evaluation_it_replaced():
    rng = np.random.default_rng(7)
    negative, negative_posteriors = _random_recordings(rng, 4, with_keywords=False)
    keywords, keyword_posteriors = _random_recordings(rng, 4, with_keywords=True)
    # A third of the thresholds, every smoothing and decision window, in an order that mixes them.
    configs = [c for c in grid() if c.threshold in (0.3, 0.6, 0.85, 0.95, 0.99)][::-1]
    results = judged_grid(negative, keywords, negative_posteriors, keyword_posteriors, LABELS, HOP_MS, WINDOW_MS,
                          configs)
    assert [config for config, _ in results] == configs
    for config, result in results:
        for recordings, posteriors in ((keywords, keyword_posteriors), (negative, negative_posteriors)):
            said, found, false_alarms, kinds = _reference_score(recordings, posteriors, LABELS, HOP_MS, WINDOW_MS,
                                                                config)
            scored = score(recordings, posteriors, LABELS, HOP_MS, WINDOW_MS, config)
            assert (scored["keywords"], scored["hits"], scored["false_alarms"]) == (
                sum(said.values()), sum(found.values()), false_alarms)
            assert scored["recall_per_keyword"] == {k: round(found[k] / n, 4) for k, n in said.items() if n}
            # In their order too (ties as they first came): the card lists them as they come.
            assert list(scored["top_false_alarms"].items()) == kinds
        # Smoothed once for many settings, or for this one alone: the same.
        assert json.dumps(result) == json.dumps(judged(negative, keywords, negative_posteriors, keyword_posteriors,
                                                       LABELS, HOP_MS, WINDOW_MS, config))
    assert any(r["false_alarms"] and 0 < r["recall"] < 1 for _, r in results), "the cases should not be trivial"
    mined = detect_all(negative_posteriors, LABELS, HOP_MS, WINDOW_MS, configs[0])
    assert mined == [reference_detect(p, LABELS, HOP_MS, WINDOW_MS, configs[0]) for p in negative_posteriors]


def test_the_operating_point_is_the_most_recall_within_the_budget():
    def point(threshold, recall, per_hour):
        return DetectorConfig(threshold=threshold), {"recall": recall, "false_alarms_per_hour": per_hour}

    results = [point(0.5, 0.95, 8.0), point(0.8, 0.90, 1.5), point(0.9, 0.90, 0.5), point(0.99, 0.6, 0.0)]
    assert choose(results)[0].threshold == 0.9  # equal recall: fewer false alarms
    assert choose(results, budget=10.0)[0].threshold == 0.5
    assert choose([point(0.5, 0.9, 30.0), point(0.9, 0.5, 12.0)])[0].threshold == 0.9  # none fits: the quietest


def _bursts(seconds: float, bursts: list[tuple[int, float, float]]) -> np.ndarray:
    """_unknown_ everywhere but 200 ms bursts of (label, start_s, height), the rest _unknown_."""
    frames = np.tile(np.array([0.0, 0.0, 0.0, 1.0], np.float32), (int(seconds * 50), 1))
    for label, start_s, height in bursts:
        first = int(start_s * 50)
        frames[first : first + 10] = 0.0
        frames[first : first + 10, label] = height
        frames[first : first + 10, 3] = 1.0 - height
    return frames


def test_keyword_thresholds_are_tuned_where_one_shared_threshold_cannot_do_both():
    # "yes" is said clearly (0.9) but speech often sounds like it (0.7); "no" is heard faintly (0.6)
    # and speech never sounds like it. One threshold finds both only by firing on the speech; "no"
    # with a threshold of its own finds both without one false alarm.
    said = [Recording(np.zeros(4 * 16000, np.float32), [("yes", 1.0, 1.2), ("no", 2.5, 2.7)], [])] * 5
    said_posteriors = [_bursts(4, [(0, 1.1, 0.9), (1, 2.6, 0.6)])] * 5
    speech = [Recording(np.zeros(60 * 16000, np.float32), [], [(0.0, 60.0)])] * 10
    speech_posteriors = [_bursts(60, [(0, 5.0 + 10 * i, 0.7) for i in range(5)])] * 10
    judge = Judge(speech, said, speech_posteriors, said_posteriors, LABELS, HOP_MS, WINDOW_MS)
    shared, on_shared = choose_operating_point(judge, keyword_thresholds=False)
    assert on_shared["recall"] == 0.5 and on_shared["false_alarms"] == 0
    assert shared.threshold > 0.7 and not shared.keyword_thresholds
    assert judge(replace(shared, threshold=0.6))["false_alarms_per_hour"] > 2.0  # both, but it fires on speech
    tuned, on_tuned = tune_keyword_thresholds(judge, shared)
    own = dict(tuned.keyword_thresholds)
    assert set(own) == {"no"} and own["no"] <= 0.6 and tuned.threshold == shared.threshold
    assert on_tuned["recall"] == 1.0 and on_tuned["false_alarms"] == 0
    assert on_tuned == judge(tuned)
    chosen, on_chosen = choose_operating_point(judge)
    assert on_chosen["recall"] == 1.0 and on_chosen["false_alarms"] == 0 and chosen.keyword_thresholds
    assert json.loads(json.dumps(chosen.as_dict()))["keyword_thresholds"] == dict(chosen.keyword_thresholds)
    assert DetectorConfig(**chosen.as_dict()) == chosen


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
