"""The log-mel frontend: correct spectra, and the same frames for any chunking of a stream."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.audio import FrontendConfig, LogMel, StreamingLogMel, _hz_to_mel, _mel_to_hz

FRONTEND = LogMel()
SIGNAL = np.random.default_rng(0).uniform(-1, 1, 16000 * 3).astype(np.float32)
ONE_SHOT = FRONTEND(SIGNAL)


def test_shape_and_frame_count():
    config = FrontendConfig()
    assert ONE_SHOT.shape == (1 + (len(SIGNAL) - 400) // 160, 40) and ONE_SHOT.dtype == np.float32
    assert config.frames_for(399) == 0 and config.frames_for(400) == 1 and config.frames_for(560) == 2
    assert FRONTEND(np.zeros(100, np.float32)).shape == (0, 40)


def test_a_tone_lights_up_the_band_that_holds_its_frequency():
    config = FrontendConfig()
    t = np.arange(16000) / 16000
    for hz in (300.0, 1000.0, 4000.0):
        features = FRONTEND(0.5 * np.sin(2 * np.pi * hz * t).astype(np.float32))
        loudest = int(np.argmax(features.mean(axis=0)))
        centres = _mel_to_hz(np.linspace(_hz_to_mel(config.low_hz), _hz_to_mel(config.high_hz), 42))[1:-1]
        assert abs(centres[loudest] - hz) < 0.1 * hz + 60, (hz, centres[loudest])


def test_silence_stays_finite():
    features = FRONTEND(np.zeros(1600, np.float32))
    assert np.isfinite(features).all() and np.allclose(features, np.log(1e-6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SIGNAL)), max_size=40))
def test_any_chunking_gives_the_one_shot_frames(cuts):
    stream = StreamingLogMel(FRONTEND)
    streamed = np.concatenate([stream.push(part) for part in np.split(SIGNAL, sorted(cuts))])
    assert streamed.shape == ONE_SHOT.shape
    np.testing.assert_allclose(streamed, ONE_SHOT, atol=1e-5)


def test_one_sample_at_a_time_and_several_seconds_at_once():
    stream = StreamingLogMel(FRONTEND)
    first = np.concatenate([stream.push(SIGNAL[i : i + 1]) for i in range(3000)])
    rest = stream.push(SIGNAL[3000:])
    np.testing.assert_allclose(np.concatenate([first, rest]), ONE_SHOT, atol=1e-5)
