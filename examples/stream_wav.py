"""Stream a WAV (or FLAC/OGG) file to a running rnnserve server at real-time pace and print
keyword detections as they happen.

    python examples/stream_wav.py recording.wav
    python examples/stream_wav.py --say "yes ... stop ... go left" --out said.wav   # make one with espeak-ng
    python examples/stream_wav.py recording.wav --fast                              # no real-time pacing
    python examples/stream_wav.py recording.wav --triton                            # KServe v2 sequence
    python examples/stream_wav.py recording.wav --version 3                         # an older version

The file is sent in 100 ms chunks of PCM16 at its own sample rate; the server resamples,
frames and steps the model with the state it holds for this stream. With --triton the same
chunks go through tritonclient's sequence API (sequence_id/start/end) instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile

from serving.grpc.client import DEFAULT_TARGET, RnnServeClient


def chunks_of(samples: np.ndarray, rate: int, chunk_ms: int, realtime: bool):
    """PCM16 bytes per chunk, released at the pace the audio would play."""
    step = max(1, rate * chunk_ms // 1000)
    started = time.monotonic()
    for offset in range(0, len(samples), step):
        if realtime:
            time.sleep(max(0.0, started + offset / rate - time.monotonic()))
        yield (np.clip(samples[offset : offset + step], -1, 1) * 32767).astype("<i2").tobytes()


def typed(args, samples: np.ndarray, rate: int) -> None:
    with RnnServeClient(args.server) as client:
        for update in client.stream(args.model, chunks_of(samples, rate, args.chunk_ms, not args.fast),
                                    version=args.version, sample_rate_hz=rate, threshold=args.threshold,
                                    report_every_ms=1000):
            for detection in update.detections:
                print(f"{detection.start_ms / 1000:7.2f}-{detection.end_ms / 1000:.2f} s  {detection.keyword:<6} "
                      f"confidence {detection.confidence:.3f}", flush=True)
            if update.final:
                print(f"end of stream after {update.stream_ms / 1000:.2f} s")


def triton(args, samples: np.ndarray, rate: int) -> None:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(args.server)
    pieces = list(chunks_of(samples, rate, args.chunk_ms, realtime=False))
    started = time.monotonic()
    for index, piece in enumerate(pieces):
        if not args.fast:
            time.sleep(max(0.0, started + index * args.chunk_ms / 1000 - time.monotonic()))
        audio = (np.frombuffer(piece, "<i2").astype(np.float32) / 32768.0)[None]
        tensor = tc.InferInput("audio", list(audio.shape), "FP32")
        tensor.set_data_from_numpy(audio)
        result = client.infer(args.model, [tensor], model_version=args.version, sequence_id=4242,
                              sequence_start=index == 0, sequence_end=index == len(pieces) - 1,
                              parameters={"sample_rate_hz": rate})
    label = result.as_numpy("label")[0].decode()
    print(f"whole-stream prediction after {len(samples) / rate:.2f} s: {label} "
          f"({result.as_numpy('probabilities')[0].max():.3f})")
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, help="WAV, FLAC or OGG file (any rate; mixed to mono)")
    parser.add_argument("--say", help="make the file with espeak-ng from these words first")
    parser.add_argument("--out", type=Path, default=Path("said.wav"), help="where --say writes (default said.wav)")
    parser.add_argument("--word-gap-ms", type=int, default=0,
                        help="--say: silence between words (espeak-ng -g; default 0, plain speech)")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    parser.add_argument("--model", default="keywords")
    parser.add_argument("--version", default="", help="model version (default: the newest)")
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.0, help="detection threshold (0: the model's default)")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time")
    parser.add_argument("--triton", action="store_true", help="use tritonclient's sequence API")
    args = parser.parse_args()
    if args.say:
        # Pauses between words: espeak-ng reads "..." as a break.
        gap = ["-g", str(args.word_gap_ms // 10)] if args.word_gap_ms else []
        wav = subprocess.run(["espeak-ng", *gap, "--stdout", args.say], capture_output=True, check=True).stdout
        args.out.write_bytes(wav)
        args.file = args.out
    if args.file is None:
        parser.error("give a file or --say WORDS")
    samples, rate = soundfile.read(args.file, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    print(f"{args.file}: {len(samples) / rate:.2f} s at {rate} Hz", file=sys.stderr)
    (triton if args.triton else typed)(args, samples, rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
