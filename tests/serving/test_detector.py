"""The keyword detector over arrays of streams equals the one-stream, frame-by-frame detector it
replaced (tests/detector_reference.py) exactly, event for event and bit for bit: for any chunking,
for streams that join and leave a batch at different steps with settings of their own, against
each stream run alone, and for whole recordings at once."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from detector_reference import ReferenceDetector, reference_detect
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.detector import BatchDetector, Detection, DetectorConfig, DetectorState
from serving.errors import InvalidInput

LABELS = ["yes", "no", "up", "_silence_", "_unknown_"]
HOP_MS, WINDOW_MS = 20.0, 30.0


def _posteriors(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Keyword bursts (with dips and rivals inside them) over _unknown_; half the time quantised,
    so that scores tie and land exactly on the threshold."""
    logits = rng.normal(0, 1, (frames, len(LABELS)))
    logits[:, -1] += 2
    for _ in range(frames // 30 + 1):
        at = int(rng.integers(0, max(frames, 1)))
        logits[at : at + int(rng.integers(2, 25)), rng.integers(0, 3)] += rng.uniform(2, 7)
    posteriors = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if rng.random() < 0.5:
        posteriors = np.round(posteriors * 8) / 8
    return posteriors.astype(np.float32)


def _config(rng: np.random.Generator) -> DetectorConfig:
    """Random settings; half the time some keywords have thresholds of their own."""
    own = {keyword: float(rng.choice([0.25, 0.5, 0.625, 0.75, 0.9]))
           for keyword in LABELS[:3] if rng.random() < 0.5} if rng.random() < 0.5 else {}
    return DetectorConfig(threshold=float(rng.choice([0.25, 0.5, 0.75, 0.9])),
                          smoothing_ms=float(rng.choice([0, 20, 40, 100, 160])),
                          decision_ms=float(rng.choice([0, 20, 100, 300, 500])),
                          refractory_ms=float(rng.choice([0, 10, 30, 100, 500])), keyword_thresholds=own)


def _chunks(rng: np.random.Generator, posteriors: np.ndarray) -> list[np.ndarray]:
    """A random chunking, empty chunks included."""
    cuts = np.sort(rng.integers(0, len(posteriors) + 1, int(rng.integers(0, 12))))
    bounds = [0, *cuts.tolist(), len(posteriors)]
    return [posteriors[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _reference(config: DetectorConfig, chunks: list[np.ndarray]) -> tuple[list[Detection], list[np.ndarray]]:
    detector = ReferenceDetector(LABELS, HOP_MS, WINDOW_MS, config)
    events, smoothed = [], []
    for chunk in chunks:
        found, scores = detector.update(chunk)
        events += found
        smoothed.append(scores)
    return events + detector.finish(), smoothed


def _batched(configs: list[DetectorConfig], chunks: list[list[np.ndarray]], first_step: list[int],
             rng: np.random.Generator) -> tuple[list[list[Detection]], list[list[np.ndarray]]]:
    """Streams stepped together: stream i joins at step first_step[i] and sometimes sits a step
    out; each step is one update of the streams in it (padding NaN: it must never be read), and
    the streams that are done finish together."""
    detector = BatchDetector(LABELS, HOP_MS, WINDOW_MS)
    rows = detector.start(configs).rows()
    events: list[list[Detection]] = [[] for _ in configs]
    smoothed: list[list[np.ndarray]] = [[] for _ in configs]
    taken = [0] * len(configs)
    step = 0
    while any(taken[i] < len(chunks[i]) for i in range(len(configs))):
        live = [i for i in range(len(configs))
                if first_step[i] <= step and taken[i] < len(chunks[i]) and rng.random() < 0.8]
        step += 1
        if not live:
            continue
        parts = [chunks[i][taken[i]] for i in live]
        batch = np.full((len(live), max(len(p) for p in parts), len(LABELS)), np.nan, np.float32)
        for row, part in enumerate(parts):
            batch[row, : len(part)] = part
        state, found, scores = detector.update(DetectorState.stack([rows[i] for i in live]), batch,
                                               [len(p) for p in parts])
        done = []
        for row, (i, part) in enumerate(zip(live, parts, strict=True)):
            rows[i] = state.rows()[row]
            events[i] += found[row]
            smoothed[i].append(scores[row, : len(part)])
            taken[i] += 1
            if taken[i] == len(chunks[i]):
                done.append(i)
        if done:
            for i, last in zip(done, detector.finish(DetectorState.stack([rows[i] for i in done])), strict=True):
                events[i] += last
    return events, smoothed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), streams=st.integers(1, 6))
def test_streams_in_one_batch_equal_each_alone_and_the_frame_by_frame_detector(seed, streams):
    rng = np.random.default_rng(seed)
    configs = [_config(rng) for _ in range(streams)]
    chunks = [_chunks(rng, _posteriors(rng, int(rng.integers(0, 400)))) for _ in range(streams)]
    together, smoothed = _batched(configs, chunks, [int(rng.integers(0, 6)) for _ in range(streams)], rng)
    for i, (config, mine) in enumerate(zip(configs, chunks, strict=True)):
        expected, expected_smoothed = _reference(config, mine)
        assert together[i] == expected
        alone, _ = _batched([config], [mine], [0], rng)
        assert alone[0] == expected
        for got, want in zip(smoothed[i], expected_smoothed, strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_event_by_hand():
    # "yes" at 0.75 for frames 10-14 and "no" at 0.875 in frame 13, no smoothing, 100 ms (5
    # frames) of decision: the event opens at frame 10, closes at frame 15 and is "no". (Binary
    # fractions: the float32 running sums are exact.)
    posteriors = np.tile(np.array([0, 0, 0, 1, 0], np.float32), (40, 1))
    posteriors[10:15] = [0.75, 0.125, 0, 0.125, 0]
    posteriors[13] = [0, 0.875, 0, 0.125, 0]
    # Frames 20-21 are within the refractory time after it; frame 38 fires again at the end.
    posteriors[20:22] = posteriors[38:40] = [0.625, 0, 0, 0.375, 0]
    config = DetectorConfig(threshold=0.5, smoothing_ms=20, decision_ms=100, refractory_ms=150)
    detector = BatchDetector(LABELS, HOP_MS, WINDOW_MS)
    state, (found,), _ = detector.update(detector.start([config]), posteriors[None], [40])
    assert found == [Detection("no", start_ms=200.0, end_ms=310.0, confidence=0.875, reported_ms=330.0)]
    assert detector.finish(state) == [[Detection("yes", 760.0, 810.0, 0.625, 810.0)]]


def test_keyword_thresholds_by_hand():
    # "yes" at 0.625 in frames 10-14, "no" at 0.75 in frames 30-34: with a shared threshold of 0.8
    # neither fires; "yes" with its own 0.6 fires alone; and where both rise in one event, the
    # keyword named is the one highest relative to its own threshold, reported with its own peak.
    posteriors = np.tile(np.array([0, 0, 0, 1, 0], np.float32), (60, 1))
    posteriors[10:15] = [0.625, 0, 0, 0.375, 0]
    posteriors[30:35] = [0, 0.75, 0, 0.25, 0]
    posteriors[50:52] = [0.625, 0.375, 0, 0, 0]
    posteriors[52:54] = [0.25, 0.75, 0, 0, 0]
    detector = BatchDetector(LABELS, HOP_MS, WINDOW_MS)

    def detect(config):
        state, (found,), _ = detector.update(detector.start([config.checked(LABELS)]), posteriors[None], [60])
        return found + detector.finish(state)[0]

    def events(config):  # confidences to float32, as a response carries them (scaled and back)
        return [(d.keyword, d.start_ms, float(np.float32(d.confidence))) for d in detect(config)]

    shared = DetectorConfig(threshold=0.8, smoothing_ms=20, decision_ms=100, refractory_ms=0)
    assert detect(shared) == []
    assert events(replace(shared, keyword_thresholds={"yes": 0.6})) == [("yes", 200.0, 0.625), ("yes", 1000.0, 0.625)]
    # yes 0.625 / 0.6 = 1.04 against no 0.75 / 0.5 = 1.5 in the last event: "no".
    both = replace(shared, keyword_thresholds={"yes": 0.6, "no": 0.5})
    assert events(both) == [("yes", 200.0, 0.625), ("no", 600.0, 0.75), ("no", 1000.0, 0.75)]
    # A request setting the shared threshold to the keyword's own value is the same detector.
    assert detect(replace(shared, threshold=0.6)) == detect(replace(shared, threshold=0.6,
                                                                     keyword_thresholds={"yes": 0.6}))


@pytest.mark.parametrize(("own", "message"), [
    ({"maybe": 0.5}, "config.keyword_thresholds: 'maybe' is not a keyword of this model (yes, no, up)"),
    ({"_silence_": 0.5}, "config.keyword_thresholds: '_silence_' is not a keyword"),
    ({"yes": 1.0}, "config.keyword_thresholds['yes']: 1.0, must be between 0 and 1 (exclusive)"),
    ({"no": 0.0}, "config.keyword_thresholds['no']: 0.0, must be between 0 and 1"),
])
def test_keyword_thresholds_out_of_range_or_unknown_are_refused(own, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        DetectorConfig(keyword_thresholds=own).checked(LABELS)


def test_labels_that_all_start_with_an_underscore_never_fire():
    detector = BatchDetector(["_silence_", "_unknown_"], HOP_MS, WINDOW_MS)
    posteriors = np.tile(np.array([[0.0, 1.0]], np.float32), (1, 30, 1))
    state, found, smoothed = detector.update(detector.start([DetectorConfig(threshold=0.1)]), posteriors, [30])
    assert found == [[]] and detector.finish(state) == [[]]
    np.testing.assert_array_equal(smoothed[0], posteriors[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk_frames=st.sampled_from([1, 7, 50, 500]))
def test_whole_recordings_at_once_equal_streaming_each_in_chunks(seed, chunk_frames):
    rng = np.random.default_rng(seed)
    recordings = [_posteriors(rng, int(rng.integers(0, 600))) for _ in range(int(rng.integers(1, 6)))]
    config = _config(rng)
    detector = BatchDetector(LABELS, HOP_MS, WINDOW_MS)
    smoothed = detector.smooth_recordings(recordings, config.smoothing_ms, chunk_frames, block_chunks=5)
    found = detector.detect_recordings(smoothed, config).detections(LABELS)
    for recording, events in zip(recordings, found, strict=True):
        assert events == reference_detect(recording, LABELS, HOP_MS, WINDOW_MS, config, chunk_frames)
