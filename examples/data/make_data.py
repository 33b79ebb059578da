"""Regenerate the sample files of examples/data/ (the committed copies are what the README runs).

    python examples/data/make_data.py        # needs espeak-ng for the audio clips and pyarrow
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REVIEWS = [
    ("a1", "Crew was lovely and we landed early, great flight"),
    ("a2", "Two hours on the tarmac and no explanation. Never again."),
    ("a3", "Is the 6pm to Denver still on time?"),
    ("a4", "lost my bag AGAIN, third time this year"),
    ("a5", "Thanks for the upgrade, made my week!"),
    ("a6", "The app logged me out and I missed check-in"),
    ("a7", "Seat 14C, window, aisle, whatever works"),
    ("a8", "Refund took 3 months but it finally arrived. ok I guess"),
    ("a9", "Gate agent in Boston went above and beyond, thank you"),
    ("a10", "Wifi didn't work for the whole 5 hour flight"),
    ("a11", "Boarding starts at 7:40, see you there"),
    ("a12", "Food was cold, blanket was dirty, staff didn't care"),
]
WORDS = {"yes.wav": ("yes", 16000), "stop.wav": ("stop", 22050), "go.flac": ("go", 44100), "left.wav": ("left", 48000)}


def main() -> None:
    (HERE / "tweets.txt").write_text("\n".join(text for _, text in REVIEWS) + "\n")
    with open(HERE / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(REVIEWS)
    (HERE / "reviews.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in REVIEWS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [i for i, _ in REVIEWS], "text": [t for _, t in REVIEWS]}), HERE / "reviews.parquet")
    import io

    import soundfile
    import soxr

    audio = HERE / "audio"
    audio.mkdir(exist_ok=True)
    for name, (word, rate) in WORDS.items():
        wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", word], capture_output=True, check=True).stdout
        samples, source_rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        soundfile.write(audio / name, soxr.resample(samples, source_rate, rate), rate)


if __name__ == "__main__":
    main()
