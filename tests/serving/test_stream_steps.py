"""Step calls of many audio streams run the keyword detector for all their rows at once: on the
bundled keywords model (real ONNX Runtime) and synthesised speech, each stream's events and
chunk posteriors equal those of the frame-by-frame detector fed that stream's own posteriors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from detector_reference import ReferenceDetector

from serving.detector import DetectorConfig
from serving.repository import load_version
from serving.streaming import StepRow, initial_state, keyword_detector, run_steps, softmax

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def version():
    versions = sorted((ROOT / "models" / "keywords").iterdir(), key=lambda p: int(p.name))
    return load_version("keywords", versions[-1])


@pytest.fixture(scope="module")
def speech(version) -> list[np.ndarray]:
    """Log-mel frames of keywords and other words said between stretches of quiet noise, by
    three voices."""
    from training.data.speech import Speaker, coloured_noise, synthesize

    rng = np.random.default_rng(0)
    streams = []
    for voice, words in (("m2", ("yes", "stop", "left", "go")), ("f3", ("no", "house", "up", "down")),
                         ("klatt", ("right", "off", "on", "yes"))):
        pieces = []
        for word in words:
            pieces += [(coloured_noise(int(rng.integers(4000, 20000)), "pink", rng) * 0.003).astype(np.float32),
                       synthesize(word, Speaker("en-US", voice))]
        streams.append(version.frontend(np.concatenate(pieces)[None])[0])
    return streams


def test_the_detector_of_a_step_batch_equals_each_stream_on_its_own(version, speech):
    rng = np.random.default_rng(1)
    configs = [DetectorConfig(threshold=t, smoothing_ms=s, decision_ms=d, refractory_ms=r)
               for t, s, d, r in ((0.5, 100, 500, 500), (0.2, 40, 100, 0), (0.3, 160, 300, 100),
                                  (0.6, 0, 0, 500), (0.1, 80, 300, 30), (0.4, 100, 500, 500))]
    # Six streams over three recordings, cut in chunks of their own, joining at different steps.
    frames = [speech[i % len(speech)] for i in range(len(configs))]
    chunks = []
    for features in frames:
        cuts = np.unique(np.concatenate([[0, len(features)], rng.integers(1, len(features), 25)]))
        chunks.append([features[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    joins = [0, 0, 2, 5, 5, 9]
    detector = keyword_detector(version)
    states = [initial_state(version) for _ in configs]
    detectors = [detector.start([config]) for config in configs]
    references = [ReferenceDetector(version.card.labels, detector.hop_ms, detector.window_ms, c) for c in configs]
    taken, events, expected, step = [0] * len(configs), [[] for _ in configs], [[] for _ in configs], 0
    while any(taken[i] < len(chunks[i]) for i in range(len(configs))):
        live = [i for i in range(len(configs)) if joins[i] <= step and taken[i] < len(chunks[i])]
        step += 1
        # A row without a detector (as the evaluation sends) shares the call.
        payloads = [[StepRow(chunks[i][taken[i]], states[i], detector=detectors[i])] for i in live]
        results = run_steps(version, [[StepRow(frames[0][:7], initial_state(version))], *payloads])
        assert results[0][0].detector is None and results[0][0].detections == []
        for i, (result,) in zip(live, results[1:], strict=True):
            states[i], detectors[i] = result.state, result.detector
            events[i] += result.detections
            found, smoothed = references[i].update(softmax(result.frame_logits.astype(np.float64)))
            expected[i] += found
            np.testing.assert_array_equal(result.posteriors_peak, smoothed.max(axis=0))
            taken[i] += 1
    for i in range(len(configs)):
        (last,) = detector.finish(detectors[i])
        assert events[i] + last == expected[i] + references[i].finish()
    assert sum(map(len, expected)) >= 6, "the recordings should make the detector fire"
