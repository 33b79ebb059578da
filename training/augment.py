"""Audio augmentation for robustness to voices, rooms and microphones unlike the training data.

Waveform level, per clip: speed perturbation (resampling, which moves pitch and tempo
together), reverberation (a synthetic exponentially decaying room response), extra coloured
noise at a random SNR, and gain. Feature level, per sequence: vocal-tract length perturbation
(the mel filterbank's frequency axis scaled, which moves formants and harmonics) and a
frequency mask. Pitch alone varies at synthesis time (espeak-ng's pitch setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.signal import oaconvolve

from serving.audio import FrontendConfig, LogMel, mel_filterbank
from training.data.speech import NOISE_COLOURS, coloured_noise, mix_at_snr


@dataclass(frozen=True)
class AugmentConfig:
    speed_probability: float = 0.8
    speed: tuple[float, float] = (0.85, 1.15)
    reverb_probability: float = 0.3
    rt60_s: tuple[float, float] = (0.1, 0.5)
    noise_probability: float = 0.5
    snr_db: tuple[float, float] = (0.0, 20.0)
    gain_db: tuple[float, float] = (-12.0, 6.0)
    warp: tuple[float, float] = (0.88, 1.12)
    frequency_mask_probability: float = 0.5
    frequency_mask_bands: int = 4


def change_speed(clip: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Play the clip `factor` times faster (linear-interpolation resampling), cut or padded at a
    random place back to its length."""
    length = len(clip)
    positions = np.arange(int((length - 1) / factor) + 1) * factor
    stretched = np.interp(positions, np.arange(length), clip).astype(np.float32)
    if len(stretched) >= length:
        start = int(rng.integers(0, len(stretched) - length + 1))
        return stretched[start : start + length]
    out = np.zeros(length, np.float32)
    start = int(rng.integers(0, length - len(stretched) + 1))
    out[start : start + len(stretched)] = stretched
    return out


def reverberate(clip: np.ndarray, rt60_s: float, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a room response: a direct path plus exponentially decaying noise that falls
    60 dB in rt60_s seconds; the result keeps the clip's RMS."""
    taps = int(min(rt60_s, 0.5) * sample_rate_hz)
    t = np.arange(taps) / sample_rate_hz
    response = (rng.standard_normal(taps) * np.exp(-6.9 * t / rt60_s) * 0.3).astype(np.float32)
    response[0] = 1.0
    # Overlap-add: about 2x a whole-signal FFT on a recording of minutes, the same on a clip.
    wet = oaconvolve(np.asarray(clip, np.float32), response)[: len(clip)]
    rms_in, rms_out = np.sqrt(np.mean(clip**2)), np.sqrt(np.mean(wet**2)) + 1e-12
    return (wet * (rms_in / rms_out)).astype(np.float32)


@lru_cache(maxsize=64)
def _warped_filterbank(config: FrontendConfig, warp: float) -> np.ndarray:
    return mel_filterbank(config, warp)


class Augmenter:
    def __init__(self, config: AugmentConfig, frontend: LogMel):
        self.config = config
        self.frontend = frontend
        # Per-band values that masked bands take (the training mean, so that they read as zero
        # once the model normalises its input).
        self.fill = np.zeros(frontend.config.mel_bands, np.float32)

    def waveform(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        if rng.random() < c.speed_probability:
            clip = change_speed(clip, float(rng.uniform(*c.speed)), rng)
        if rng.random() < c.reverb_probability:
            clip = reverberate(clip, float(rng.uniform(*c.rt60_s)), self.frontend.config.sample_rate_hz, rng)
        if rng.random() < c.noise_probability and np.any(clip):
            noise = coloured_noise(len(clip), str(rng.choice(NOISE_COLOURS)), rng, fast=True)
            clip = mix_at_snr(clip, noise, float(rng.uniform(*c.snr_db)))
        clip = clip * np.float32(10 ** (rng.uniform(*c.gain_db) / 20))
        return np.clip(clip, -1.0, 1.0).astype(np.float32)

    def features(self, waveforms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Log-mel features [B, T, F] of waveforms [B, S], each row with its own warp and mask."""
        c = self.config
        power = self.frontend.power(waveforms)
        rows = []
        for row in power:
            # Warps on a 0.01 grid so that the cached filterbanks are few.
            warp = round(float(rng.uniform(*c.warp)), 2)
            features = self.frontend.log_mel(row, _warped_filterbank(self.frontend.config, warp))
            if rng.random() < c.frequency_mask_probability:
                width = int(rng.integers(1, c.frequency_mask_bands + 1))
                start = int(rng.integers(0, features.shape[1] - width + 1))
                features[:, start : start + width] = self.fill[start : start + width]
            rows.append(features)
        return np.stack(rows)
