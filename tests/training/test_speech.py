"""The espeak-ng speech-commands synthesiser (needs the Debian package espeak-ng)."""

from __future__ import annotations

import json

import numpy as np

from training.data.speech import (
    CLIP_SAMPLES,
    LABELS,
    GenerationConfig,
    coloured_noise,
    generate_dataset,
    mix_at_snr,
    speakers,
    split_of,
    synthesize,
)


def test_speakers_are_voices_times_variants_split_by_speaker():
    all_speakers = speakers()
    voices = {s.voice for s in all_speakers}
    variants = {s.variant for s in all_speakers}
    assert len(voices) >= 5 and len(variants) >= 100 and len(all_speakers) == len(voices) * len(variants)
    splits = [split_of(s) for s in all_speakers]
    assert splits == [split_of(s) for s in all_speakers]
    assert {"train", "validation", "test"} == set(splits)
    assert 0.08 < splits.count("test") / len(splits) < 0.25


def test_synthesised_word_is_16khz_speech_of_plausible_length():
    speaker = speakers()[0]
    samples = synthesize("left", speaker, rate_wpm=160)
    assert samples.dtype == np.float32 and np.abs(samples).max() <= 1.0
    assert 0.15 * 16000 < len(samples) < 1.0 * 16000
    assert len(synthesize("left", speaker, rate_wpm=300)) < len(synthesize("left", speaker, rate_wpm=100))


def test_noise_colours_and_snr():
    rng = np.random.default_rng(0)
    power = {}
    for colour in ("white", "pink", "brown"):
        noise = coloured_noise(16000, colour, rng)
        assert abs(float(np.sqrt(np.mean(noise**2))) - 1.0) < 1e-3
        spectrum = np.abs(np.fft.rfft(noise)) ** 2
        power[colour] = spectrum[:400].sum() / spectrum[4000:].sum()  # low (<400 Hz) vs high (>4 kHz)
    assert power["brown"] > power["pink"] > power["white"]
    signal = 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    noise = coloured_noise(16000, "white", rng)
    mixed = mix_at_snr(signal, noise, 10.0)
    snr = 10 * np.log10(np.mean(signal**2) / np.mean((mixed - signal) ** 2))
    assert abs(snr - 10.0) < 0.01


def test_generated_data_set_has_a_manifest_no_speaker_in_two_splits_and_is_cached(tmp_path):
    folder = generate_dataset(tmp_path, GenerationConfig(), speaker_limit=8, workers=2)
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    clips = np.load(folder / "clips.npy")
    assert clips.shape == (len(rows), CLIP_SAMPLES) and clips.dtype == np.int16
    assert {row["label"] for row in rows} == set(LABELS)
    split_by_speaker = {}
    for row in rows:
        split_by_speaker.setdefault((row["voice"], row["variant"]), set()).add(row["split"])
    assert len(split_by_speaker) == 8
    assert "train" in set.union(*split_by_speaker.values())
    # Unseen-voice parts never share a speaker with training; "test_seen" holds extra clips of
    # training speakers only.
    assert all(parts in ({"train"}, {"validation"}, {"test"}, {"train", "test_seen"})
               for parts in split_by_speaker.values())
    seen_speakers = sum(parts == {"train", "test_seen"} for parts in split_by_speaker.values())
    assert len(rows) == (8 * GenerationConfig().clips_per_keyword + seen_speakers) * 12
    # A word is a burst over the noise floor; silence clips are steady noise.
    def burstiness(clip):
        frame_rms = np.sqrt(np.mean(clip.astype(np.float64).reshape(40, 400) ** 2, axis=1)) + 1e-9
        return frame_rms.max() / np.median(frame_rms)

    bursts = {label: np.median([burstiness(clips[i]) for i, r in enumerate(rows) if r["label"] == label])
              for label in ("yes", "_silence_")}
    assert bursts["yes"] > 2 * bursts["_silence_"]
    assert generate_dataset(tmp_path, GenerationConfig(), speaker_limit=8) == folder
