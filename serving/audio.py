"""Log-mel features in numpy, shared by training and serving, exact in any chunking.

Frames are not centred: frame k covers samples [k*hop, k*hop + window). A stream
therefore yields exactly the frames of the whole signal, whatever the chunk sizes,
by keeping the samples of the unfinished frame between chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

try:  # scipy's FFT runs float32 frames about 2.4x faster than numpy's; numpy serves without it
    from scipy.fft import rfft as _rfft
except ImportError:  # pragma: no cover - the serving images have no scipy
    _rfft = np.fft.rfft


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate_hz: int = 16000
    window_samples: int = 400  # 25 ms
    hop_samples: int = 160  # 10 ms
    fft_size: int = 512
    mel_bands: int = 40
    low_hz: float = 20.0
    high_hz: float = 7600.0
    # Added before the logarithm so silence stays finite.
    log_floor: float = 1e-6

    def frames_for(self, samples: int) -> int:
        if samples < self.window_samples:
            return 0
        return 1 + (samples - self.window_samples) // self.hop_samples


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


class LogMel:
    """Log-mel filterbank energies [frames, mel_bands] float32 of mono float samples in [-1, 1]."""

    def __init__(self, config: FrontendConfig = FrontendConfig()):
        if config.window_samples > config.fft_size:
            raise ValueError("window_samples must not exceed fft_size")
        self.config = config

    @cached_property
    def window(self) -> np.ndarray:
        # Periodic Hann window.
        n = np.arange(self.config.window_samples)
        return (0.5 - 0.5 * np.cos(2 * np.pi * n / self.config.window_samples)).astype(np.float32)

    @cached_property
    def filterbank(self) -> np.ndarray:
        """Triangular mel filters [fft_size // 2 + 1, mel_bands] (HTK mel scale)."""
        return mel_filterbank(self.config)

    def power(self, samples: np.ndarray) -> np.ndarray:
        """Power spectra [..., frames, fft_size // 2 + 1] of samples [..., S] (leading axes kept)."""
        c = self.config
        samples = np.asarray(samples, dtype=np.float32)
        starts = np.arange(c.frames_for(samples.shape[-1])) * c.hop_samples
        return self.frame_power(samples[..., starts[:, None] + np.arange(c.window_samples)[None, :]])

    def frame_power(self, frames: np.ndarray) -> np.ndarray:
        """Power spectra [..., fft_size // 2 + 1] of frames [..., window_samples], windowed here."""
        windowed = (frames * self.window).reshape(-1, frames.shape[-1])  # 2-D: the faster FFT loop
        spectra = _rfft(windowed, n=self.config.fft_size, axis=-1)
        power = (spectra.real**2 + spectra.imag**2).astype(np.float32, copy=False)
        return power.reshape(*frames.shape[:-1], power.shape[-1])

    def log_mel(self, power: np.ndarray, filterbank: np.ndarray | None = None) -> np.ndarray:
        filters = self.filterbank if filterbank is None else filterbank
        return np.log(power @ filters + self.config.log_floor).astype(np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Features [..., frames, mel_bands] of samples [..., S]; a batch of equal-length clips works too."""
        samples = np.asarray(samples, dtype=np.float32)
        if self.config.frames_for(samples.shape[-1]) == 0:
            return np.zeros((*samples.shape[:-1], 0, self.config.mel_bands), np.float32)
        return self.log_mel(self.power(samples))


def mel_filterbank(config: FrontendConfig, warp: float = 1.0) -> np.ndarray:
    """Triangular mel filters [fft_size // 2 + 1, mel_bands]; warp != 1 scales the frequency axis
    (vocal-tract length perturbation, used by training augmentation only)."""
    c = config
    bins = np.fft.rfftfreq(c.fft_size, 1.0 / c.sample_rate_hz) * warp
    edges = _mel_to_hz(np.linspace(_hz_to_mel(c.low_hz), _hz_to_mel(c.high_hz), c.mel_bands + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32)


def push_streams(frontend: LogMel, pending: list[np.ndarray], chunks: list[np.ndarray]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Streaming log-mel of many streams at once. Stream i has its leftover samples pending[i]
    (from its previous chunks) and a new chunk chunks[i] (float32, any length, empty too); returns
    each stream's frames completed by its chunk [frames_i, mel_bands] and its new leftover (the
    samples from its next frame's start on). The frames of all streams are gathered from one
    buffer and go through one FFT and one filterbank product."""
    c = frontend.config
    buffer = np.concatenate([part for pair in zip(pending, chunks, strict=True) for part in pair]
                            ).astype(np.float32, copy=False)
    lengths = np.array([len(p) + len(chunk) for p, chunk in zip(pending, chunks, strict=True)], np.int64)
    ends = np.cumsum(lengths)
    offsets = ends - lengths
    counts = np.where(lengths >= c.window_samples, (lengths - c.window_samples) // c.hop_samples + 1, 0)
    firsts = np.cumsum(counts) - counts
    # Frame k of stream i starts at offsets[i] + k * hop: it never reaches into stream i + 1.
    stream = np.repeat(np.arange(len(counts)), counts)
    starts = offsets[stream] + (np.arange(int(counts.sum())) - firsts[stream]) * c.hop_samples
    power = frontend.frame_power(buffer[starts[:, None] + np.arange(c.window_samples)[None, :]])
    features = frontend.log_mel(power)
    return ([features[first : first + count] for first, count in zip(firsts, counts, strict=True)],
            [buffer[offset + count * c.hop_samples : end].copy()
             for offset, count, end in zip(offsets, counts, ends, strict=True)])


class StreamingLogMel:
    """One stream: feeds chunks of any size; each push returns the frames completed by that chunk."""

    def __init__(self, frontend: LogMel):
        self.frontend = frontend
        self.pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        (features,), (self.pending,) = push_streams(self.frontend, [self.pending], [np.asarray(samples, np.float32)])
        return features


MAX_SOURCE_RATE_HZ = 384_000


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """Signed 16-bit samples (any shape) as float32 in [-1, 1)."""
    return np.asarray(samples).astype(np.float32) / 32768.0


def decode_pcm16_chunks(chunks: list[bytes]) -> list[np.ndarray]:
    """Little-endian PCM16 chunks (each a whole number of samples) as float32, decoded together."""
    if not chunks:
        return []
    decoded = pcm16_to_float(np.frombuffer(b"".join(chunks), dtype="<i2"))
    ends = np.cumsum([len(chunk) // 2 for chunk in chunks], dtype=np.int64)
    return np.split(decoded, ends[:-1])


def decode_clip(
    field: str, target_rate_hz: int, max_seconds: float, *, file: bytes | None = None,
    pcm16: bytes | None = None, samples: np.ndarray | None = None, sample_rate_hz: int = 0,
) -> np.ndarray:
    """One clip as mono float32 samples at target_rate_hz, from an encoded file (WAV, FLAC,
    OGG), raw little-endian PCM16 or float samples. Raises InvalidInput naming `field`."""
    import io

    import soundfile
    import soxr

    from serving.errors import InvalidInput

    if file is not None:
        try:
            data, sample_rate_hz = soundfile.read(io.BytesIO(file), dtype="float32", always_2d=True)
        except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as error:
            reason = getattr(error, "error_string", None) or str(error)  # without libsndfile's object repr
            raise InvalidInput(f"{field}.file: not a readable WAV/FLAC/OGG file ({reason})") from None
        audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    else:
        if not 0 < sample_rate_hz <= MAX_SOURCE_RATE_HZ:
            raise InvalidInput(
                f"{field}.sample_rate_hz: {sample_rate_hz}, must be 1 to {MAX_SOURCE_RATE_HZ} Hz for raw samples"
            )
        if pcm16 is not None:
            if len(pcm16) % 2:
                raise InvalidInput(f"{field}.pcm16: {len(pcm16)} bytes, not a whole number of 16-bit samples")
            audio = pcm16_to_float(np.frombuffer(pcm16, dtype="<i2"))
        else:
            audio = np.asarray(samples, dtype=np.float32)
            if not np.isfinite(audio).all():
                raise InvalidInput(f"{field}.samples: NaN or infinite values")
    if audio.size == 0:
        raise InvalidInput(f"{field}: no samples")
    seconds = audio.size / sample_rate_hz
    if seconds > max_seconds:
        raise InvalidInput(f"{field}: {seconds:.2f} s of audio, limit {max_seconds:g} s")
    if sample_rate_hz != target_rate_hz:
        audio = soxr.resample(audio, sample_rate_hz, target_rate_hz, quality="HQ").astype(np.float32)
    return np.clip(audio, -1.0, 1.0)
