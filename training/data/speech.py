"""A speech-commands data set synthesised offline with espeak-ng.

Speakers are espeak-ng English voices combined with its voice variants
(`espeak-ng-data/voices/!v`); each clip also varies speaking rate, pitch and
amplitude, sits at a random offset in a 1 s, 16 kHz window and is mixed with
coloured noise at a random SNR. The split is by speaker (voice+variant), so test
speakers are never heard in training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.signal import resample_poly

if TYPE_CHECKING:
    from training.data.dataset import AudioClips

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = [*KEYWORDS, SILENCE, UNKNOWN]
# The Speech Commands auxiliary words, plus digits.
UNKNOWN_WORDS = [
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow", "backward",
    "forward", "follow", "learn", "visual", "zero", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine",
]
SAMPLE_RATE_HZ = 16000
CLIP_SAMPLES = SAMPLE_RATE_HZ
ESPEAK_RATE_HZ = 22050
NOISE_COLOURS = ("white", "pink", "brown")


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True, order=True)
class Speaker:
    voice: str  # an espeak-ng English voice, e.g. en-us
    variant: str  # an espeak-ng voice variant, e.g. Alex

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}"


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise SynthesisError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return path


@cache
def speakers() -> list[Speaker]:
    """Every English (non-MBROLA) voice with every variant espeak-ng ships, sorted."""
    listing = subprocess.run([_espeak(), "--voices=en"], capture_output=True, text=True, check=True).stdout
    voices = sorted({
        line.split()[4].split("/")[1] for line in listing.splitlines()[1:]
        if len(line.split()) > 4 and line.split()[4].startswith("gmw/")
    })
    variants = subprocess.run([_espeak(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variant_names = sorted({
        line.split()[4].split("/")[-1] for line in variants.splitlines()[1:] if len(line.split()) > 4
    })
    return [Speaker(voice, variant) for voice in voices for variant in variant_names]


def split_of(speaker: Speaker, test_fraction: float = 0.15, validation_fraction: float = 0.1) -> str:
    """train / validation / test by a stable hash of the speaker: clips never decide it."""
    position = int(hashlib.sha256(speaker.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


def synthesize(word: str, speaker: Speaker, rate_wpm: int = 160, pitch: int = 50, amplitude: int = 100) -> np.ndarray:
    """The spoken word as float32 samples in [-1, 1] at 16 kHz, leading/trailing silence trimmed."""
    result = subprocess.run(
        [_espeak(), "-v", speaker.name, "-s", str(rate_wpm), "-p", str(pitch), "-a", str(amplitude), "--stdout", word],
        capture_output=True, check=False, timeout=30,
    )
    if result.returncode != 0 or len(result.stdout) <= 44:
        raise SynthesisError(f"espeak-ng failed for {word!r} with {speaker.name}: {result.stderr.decode()[:200]}")
    # espeak-ng writes a streaming WAV header (its sizes are placeholders): the PCM starts at byte 44.
    pcm = np.frombuffer(result.stdout[44 : 44 + (len(result.stdout) - 44) // 2 * 2], dtype="<i2")
    return trim_silence(_pcm_at_16khz(pcm, ESPEAK_RATE_HZ))


def _pcm_at_16khz(pcm: np.ndarray, rate_hz: int) -> np.ndarray:
    ratio = Fraction(SAMPLE_RATE_HZ, rate_hz)
    return resample_poly(pcm.astype(np.float32) / 32768.0, ratio.numerator, ratio.denominator)


def trim_silence(samples: np.ndarray) -> np.ndarray:
    """float32 samples with leading and trailing silence (below 0.01) trimmed."""
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0] : loud[-1] + 1].astype(np.float32) if loud.size else samples.astype(np.float32)


class _EspeakEvent(ctypes.Structure):
    # espeak_EVENT from espeak-ng's speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_ESPEAK_WORD_EVENT, _ESPEAK_END_EVENT = 1, 5
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH = 1, 2, 3
_ESPEAK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.POINTER(_EspeakEvent))


class _EspeakLibrary:
    """libespeak-ng in this process, synchronous: the same synthesiser as the espeak-ng command,
    which does not say where each word lies; the library's word events do."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as error:
            raise SynthesisError(f"libespeak-ng is missing (Debian: apt-get install espeak-ng): {error}") from None
        self.rate_hz = self.lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS
        if self.rate_hz <= 0:
            raise SynthesisError("libespeak-ng failed to initialise")
        self.pcm: list[np.ndarray] = []
        self.words: list[tuple[int, int]] = []  # (text position, first sample) of each word
        self.end = 0
        self._callback = _ESPEAK_CALLBACK(self._on_audio)  # kept: the library holds only a pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, count, events) -> int:
        if count > 0:
            self.pcm.append(np.ctypeslib.as_array(wav, (count,)).copy())
        index = 0
        while events[index].type != 0:
            event = events[index]
            if event.type == _ESPEAK_WORD_EVENT:
                self.words.append((event.text_position, event.sample))
            elif event.type == _ESPEAK_END_EVENT:
                self.end = event.sample
            index += 1
        return 0

    def speak(self, text: str, voice: str, rate_wpm: int, pitch: int, amplitude: int):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SynthesisError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in ((_ESPEAK_RATE, rate_wpm), (_ESPEAK_PITCH, pitch), (_ESPEAK_VOLUME, amplitude)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self.pcm, self.words, self.end = [], [], 0
        data = text.encode()
        # position type 1 (POS_CHARACTER), flags 0 (espeakCHARS_AUTO): text positions count characters from 1
        if self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None) != 0:
            raise SynthesisError(f"espeak-ng failed for {text!r} with {voice}")
        self.lib.espeak_Synchronize()
        pcm = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.int16)
        return pcm, list(self.words), max(self.end, len(pcm))


@cache
def _espeak_library() -> _EspeakLibrary:
    return _EspeakLibrary()


def synthesize_timed(text: str, word_start: int, speaker: Speaker, rate_wpm: int = 160, pitch: int = 50,
                     amplitude: int = 100) -> tuple[np.ndarray, float, float]:
    """`text` spoken in one breath as float32 at 16 kHz (leading and trailing silence trimmed),
    with where the word at character `word_start` of it lies: (samples, start_s, end_s). The
    word ends where the next word begins, less any quiet before it, or where the speech ends."""
    library = _espeak_library()
    pcm, words, end = library.speak(text, speaker.name, rate_wpm, pitch, amplitude)
    # Word events count characters from 1; after a sentence break ("board. yes") espeak-ng 1.51
    # reports one less, so the word is the event nearest to where it begins.
    nearest = min(words, key=lambda word: abs(word[0] - 1 - word_start), default=None)
    if nearest is None or abs(nearest[0] - 1 - word_start) > 2 or len(pcm) == 0:
        raise SynthesisError(f"espeak-ng reported no word at character {word_start} of {text!r}")
    later = [sample for position, sample in words if position > nearest[0]]
    scale = SAMPLE_RATE_HZ / library.rate_hz
    start, stop = int(nearest[1] * scale), int((min(later) if later else end) * scale)
    return timed_trim(_pcm_at_16khz(pcm, library.rate_hz).astype(np.float32), start, stop)


def timed_trim(samples: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, float, float]:
    """Leading and trailing silence trimmed from `samples`, and the word [start, stop) in seconds
    within what is left, its own trailing quiet (a pause before the next word) cut off."""
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    if not loud.size:
        raise SynthesisError("the synthesiser produced silence")
    first, last = int(loud[0]), int(loud[-1]) + 1
    stop = min(stop, last)
    inside = loud[(loud >= start) & (loud < stop)]
    if inside.size:
        stop = int(inside[-1]) + 1
    start = max(start, first)
    if stop <= start:
        raise SynthesisError("the timed word has no sound")
    return samples[first:last], (start - first) / SAMPLE_RATE_HZ, (stop - first) / SAMPLE_RATE_HZ


def coloured_noise(samples: int, colour: str, rng: np.random.Generator, fast: bool = False) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power) noise. fast: drawn and shaped in
    float32 (scipy.fft), white without a transform: the same noise, about 3x faster, other draws
    from `rng` (stream training; the clip data keeps the float64 draws it was made with)."""
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
    frequencies = np.maximum(np.fft.rfftfreq(samples), 1.0 / samples)
    if fast:
        import scipy.fft

        noise = rng.standard_normal(samples, dtype=np.float32)
        if exponent:
            shape = (frequencies**-exponent).astype(np.float32)
            noise = scipy.fft.irfft(scipy.fft.rfft(noise) * shape, n=samples)
    else:
        noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(samples)) / frequencies**exponent, n=samples)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def place_in_clip(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The word at a random offset in a 1 s clip (cut to fit when longer)."""
    speech = speech[:CLIP_SAMPLES]
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    offset = int(rng.integers(0, CLIP_SAMPLES - len(speech) + 1))
    clip[offset : offset + len(speech)] = speech
    return clip


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    signal_power = float(np.mean(signal**2)) + 1e-12
    noise_power = float(np.mean(noise**2)) + 1e-12
    mixed = signal + noise * np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    peak = float(np.max(np.abs(mixed)))
    return (mixed / peak * 0.95 if peak > 0.95 else mixed).astype(np.float32)


@dataclass(frozen=True)
class GenerationConfig:
    # Clips per keyword per speaker; unknown words and silence get as many clips per speaker
    # as one keyword does, spread over their words and noise colours.
    clips_per_keyword: int = 2
    rate_wpm: tuple[int, int] = (120, 220)
    pitch: tuple[int, int] = (20, 80)
    amplitude: tuple[int, int] = (60, 140)
    snr_db: tuple[float, float] = (5.0, 30.0)
    silence_level_db: tuple[float, float] = (-60.0, -15.0)
    # This share of the training speakers records one more round of clips, held out as the
    # "seen voices" test set (split "test_seen"), to measure the drop from seen to unseen voices.
    seen_test_fraction: float = 0.2
    seed: int = 13


def _clip_plan(speaker: Speaker, config: GenerationConfig) -> list[dict]:
    """What to render for one speaker: every keyword, unknown words, silence."""
    rng = np.random.default_rng([config.seed, int(hashlib.sha256(speaker.name.encode()).hexdigest()[:8], 16)])
    split = split_of(speaker)
    rounds = [split] * config.clips_per_keyword
    seen_position = int(hashlib.sha256(f"seen:{speaker.name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if split == "train" and seen_position < config.seen_test_fraction:
        rounds.append("test_seen")
    plan = []
    for part in rounds:
        words = [*KEYWORDS, *rng.choice(UNKNOWN_WORDS, size=1), SILENCE]
        for word in words:
            plan.append({
                "split": part,
                "word": word,
                "label": word if word in KEYWORDS or word == SILENCE else UNKNOWN,
                "rate_wpm": int(rng.integers(*config.rate_wpm, endpoint=True)),
                "pitch": int(rng.integers(*config.pitch, endpoint=True)),
                "amplitude": int(rng.integers(*config.amplitude, endpoint=True)),
                "snr_db": round(float(rng.uniform(*config.snr_db)), 1),
                "noise": str(rng.choice(NOISE_COLOURS)),
                "level_db": round(float(rng.uniform(*config.silence_level_db)), 1),
                "seed": int(rng.integers(2**31)),
            })
    return plan


def render_speaker(speaker: Speaker, config: GenerationConfig) -> tuple[list[dict], np.ndarray]:
    """Manifest rows and int16 clips [n, 16000] for one speaker."""
    rows, clips = [], []
    for item in _clip_plan(speaker, config):
        rng = np.random.default_rng(item["seed"])
        noise = coloured_noise(CLIP_SAMPLES, item["noise"], rng)
        if item["word"] == SILENCE:
            clip = noise * np.float32(10 ** (item["level_db"] / 20))
        else:
            speech = synthesize(item["word"], speaker, item["rate_wpm"], item["pitch"], item["amplitude"])
            clip = mix_at_snr(place_in_clip(speech, rng), noise, item["snr_db"])
        clips.append(np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16))
        rows.append({**item, "voice": speaker.voice, "variant": speaker.variant})
    return rows, np.stack(clips)


def espeak_version() -> str:
    return subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def generate_dataset(
    cache_dir: Path, config: GenerationConfig = GenerationConfig(), speaker_limit: int = 0,
    workers: int = 2, progress: bool = False,
) -> Path:
    """Render the data set once into cache_dir/<digest>/ (clips.npy int16 [N, 16000],
    manifest.jsonl, generation.json) and return that folder; later calls reuse it."""
    import json
    import os
    import tempfile
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    chosen = speakers()
    if speaker_limit:
        # Spread a limited set over all voices, variants and splits rather than taking the first
        # ones (salted: the split hash alone would pick test speakers only).
        chosen = sorted(chosen, key=lambda s: hashlib.sha256(f"subset:{s.name}".encode()).hexdigest())[:speaker_limit]
    description = {"config": config.__dict__, "speakers": [s.name for s in chosen], "espeak": espeak_version()}
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir / digest
    if (target / "manifest.jsonl").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".speech-", dir=cache_dir))
    rows, clips = [], []
    with get_context("spawn").Pool(max(1, workers)) as pool:
        results = pool.imap(_render, [(speaker, config) for speaker in chosen], chunksize=4)
        for speaker_rows, speaker_clips in tqdm(results, total=len(chosen), disable=not progress,
                                                desc="synthesising", unit="speaker"):
            rows.extend(speaker_rows)
            clips.append(speaker_clips)
    np.save(staging / "clips.npy", np.concatenate(clips))
    with open(staging / "manifest.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (staging / "generation.json").write_text(json.dumps(description, indent=2))
    try:
        os.rename(staging, target)
    except OSError:  # another process rendered the same data set meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _render(job: tuple[Speaker, GenerationConfig]) -> tuple[list[dict], np.ndarray]:
    return render_speaker(*job)


def load_generated(folder: Path) -> AudioClips:
    """A data set written by generate_dataset, split as its manifest says."""
    import json

    from training.data.dataset import AudioClips

    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    clips = np.load(folder / "clips.npy", mmap_mode="r")
    if len(clips) != len(rows):
        raise ValueError(f"{folder}: {len(clips)} clips but {len(rows)} manifest rows")
    return AudioClips(
        clips=np.asarray(clips), labels=[LABELS.index(row["label"]) for row in rows],
        parts=[row["split"] for row in rows], sources=[f"{row['voice']}+{row['variant']}" for row in rows],
        label_names=list(LABELS), source=f"espeak-ng speech commands ({folder.name})",
    )
