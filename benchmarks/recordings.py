"""Keyword recordings for the stream benchmarks: espeak-ng keywords in quiet noise, with the
time each keyword starts and ends, written as mono 16 kHz PCM16 WAVs and a JSON manifest.

    python benchmarks/recordings.py runs/recordings --count 4 --seconds 8

Recording i is spoken by its own espeak-ng speaker; a keyword starts every 2 s from 1 s on,
and the last one ends at least 0.5 s (the detection window) before the recording does.
"""

from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATE_HZ = 16000
SPEAKERS = [("en-US", "m3"), ("en", "f2"), ("en-GB-x-rp", "Alex"), ("en-029", "f4"), ("en-US-nyc", "m1"),
            ("en-GB-scotland", "f1")]
WORDS = ["yes", "stop", "go", "left", "no", "right", "up", "down", "on", "off"]
FIRST_S, EVERY_S, AFTER_S = 1.0, 2.0, 0.5


def keyword_recording(index: int, seconds: float) -> tuple[np.ndarray, list[dict]]:
    """Float samples in [-1, 1] at 16 kHz and the keywords spoken in them (start_ms, end_ms)."""
    from training.data.speech import Speaker, synthesize

    rng = np.random.default_rng(index)
    audio = (rng.standard_normal(int(RATE_HZ * seconds)) * 0.003).astype(np.float32)
    speaker = Speaker(*SPEAKERS[index % len(SPEAKERS)])
    keywords = []
    for slot in range(int(seconds // EVERY_S) + 1):
        word = WORDS[(3 * index + slot) % len(WORDS)]
        speech = synthesize(word, speaker)[:RATE_HZ]
        start = int(RATE_HZ * (FIRST_S + EVERY_S * slot))
        if start + len(speech) > len(audio) - RATE_HZ * AFTER_S:
            break
        audio[start : start + len(speech)] += speech
        keywords.append({"keyword": word, "start_ms": 1000 * start / RATE_HZ,
                         "end_ms": 1000 * (start + len(speech)) / RATE_HZ})
    return np.clip(audio, -1, 1), keywords


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def write_recordings(folder: Path, count: int, seconds: float) -> Path:
    """`count` recordings of `seconds` each in `folder`; returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        samples, keywords = keyword_recording(index, seconds)
        name = f"keywords-{index}"
        with wave.open(str(folder / f"{name}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(RATE_HZ)
            out.writeframes(pcm16(samples))
        entries.append({"name": name, "wav": f"{name}.wav", "speaker": "+".join(SPEAKERS[index % len(SPEAKERS)]),
                        "keywords": keywords})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"sample_rate_hz": RATE_HZ, "recordings": entries}, indent=2) + "\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(f"wrote {write_recordings(args.folder, args.count, args.seconds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
