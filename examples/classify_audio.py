"""Spot keywords in audio files with a running rnnserve server through the typed API.

    python examples/classify_audio.py yes.wav stop.flac
    python examples/classify_audio.py --say yes --say "go"     # speak with espeak-ng first

Files may be WAV, FLAC or OGG at any sample rate, mono or not: the server decodes, mixes down
and resamples them to the model's 16 kHz.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from serving.grpc.client import DEFAULT_TARGET, RnnServeClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="audio files")
    parser.add_argument("--say", action="append", default=[], help="a word for espeak-ng to say (repeatable)")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    parser.add_argument("--model", default="keywords", help="model name (default keywords)")
    args = parser.parse_args()
    clips, names = [path.read_bytes() for path in args.files], [str(path) for path in args.files]
    for word in args.say:
        if shutil.which("espeak-ng") is None:
            print("error: --say needs espeak-ng (apt-get install espeak-ng)", file=sys.stderr)
            return 2
        # espeak-ng writes a 22.05 kHz WAV; the server resamples it.
        clips.append(subprocess.run(["espeak-ng", "--stdout", word], capture_output=True, check=True).stdout)
        names.append(f"espeak-ng: {word!r}")
    if not clips:
        parser.error("give audio files or --say WORD")
    with RnnServeClient(args.server) as client:
        try:
            results = client.classify_audio(args.model, clips, top_k=3)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    for name, result in zip(names, results, strict=True):
        top = ", ".join(f"{t.label} {t.score:.3f}" for t in result.top)
        print(f"{result.label:<10} {result.score:.3f}  [{top}]  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
